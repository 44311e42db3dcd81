"""The simulator daemon: moto's ThreadedMotoServer with the EC2 rules installed, a WSGI
layer for API fault injection, the instance runtime, and the EBS direct APIs (ebsdirect.py)
on their own lean endpoint (ebsserver.py, config "ebs_port") as well as on moto's port.
Run as `python -m ec2sim.daemon STATE_DIR`; writes STATE_DIR/ready once warmed up."""
import io
import os
import signal
import sys
import threading
import time
import uuid
from urllib.parse import parse_qs

# moto reads these at call time, but set them before import to be sure.
for _v in ("MOTO_ENABLE_AMI_VALIDATION", "MOTO_ENABLE_KEYPAIR_VALIDATION",
           "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION"):
    os.environ[_v] = "true"

from moto.moto_server import threaded_moto_server as tms  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # noqa: E402

from . import (config, ebsdirect, ebsserver, faults, firewall, rules, runtime,  # noqa: E402
               statusview, timing)

INTERNAL_HEADER = "HTTP_X_EC2SIM_INTERNAL"


def ebs_route(api, environ, start_response):
    """An EBS direct request that came to moto's port (a client given AWS_ENDPOINT_URL
    only): answered by the same ebsdirect.Api as the lean endpoint."""
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
               if k.startswith("HTTP_")}
    for k in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(k):
            headers[k.replace("_", "-").lower()] = environ[k]
    try:
        n = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        n = 0
    inp = environ["wsgi.input"]
    body = inp.read(n) if n else (inp.read() if environ.get("wsgi.input_terminated") else b"")
    if "aws-chunked" in headers.get("content-encoding", "").lower():
        body = ebsserver.aws_chunked(body)
    qs = environ.get("QUERY_STRING", "")
    status, rh, rbody = api.handle(environ["REQUEST_METHOD"],
                                   environ.get("PATH_INFO", "") + ("?" + qs if qs else ""),
                                   headers, body)
    start_response(f"{status} {ebsserver.REASONS.get(status, 'Error')}",
                   rh + [("Content-Length", str(len(rbody)))])
    return [bytes(rbody)]


def fault_layer(app, sdir, api=None):
    """Fail the next N calls of an action before moto sees them. Requests carrying the
    X-Ec2sim-Internal header (the status command, warm-up) are never failed. The EBS direct
    routes (/snapshots...) go to ebsdirect.Api, which applies its own faults."""
    fpath = os.path.join(sdir, "faults.json")

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == statusview.PATH and environ.get("REQUEST_METHOD") == "GET":
            return statusview.app_route(sdir, start_response)
        if api is not None and (environ.get("PATH_INFO") or "").startswith("/snapshots"):
            return ebs_route(api, environ, start_response)
        if not os.path.exists(fpath) or environ.get(INTERNAL_HEADER):
            return app(environ, start_response)
        try:
            n = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            n = 0
        body = environ["wsgi.input"].read(n) if n else b""
        environ["wsgi.input"] = io.BytesIO(body)
        action = None
        if environ.get("REQUEST_METHOD") == "POST":
            action = (parse_qs(body.decode("utf-8", "replace")).get("Action") or [None])[0]
        if not action:
            action = (parse_qs(environ.get("QUERY_STRING", "")).get("Action") or [None])[0]
        code = faults.take_api(sdir, action) if action else None
        if not code:
            return app(environ, start_response)
        status = faults.HTTP_STATUS.get(code, 400)
        rid = str(uuid.uuid4())
        xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
               f"<Code>{code}</Code><Message>Simulated fault: {code} for {action}.</Message>"
               f"</Error></Errors><RequestID>{rid}</RequestID></Response>").encode()
        reason = {400: "Bad Request", 500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "Error")
        start_response(f"{status} {reason}", [("Content-Type", "text/xml"),
                                              ("Content-Length", str(len(xml))),
                                              ("x-amzn-RequestId", rid)])
        return [xml]
    return wrapped


class Server(tms.ThreadedMotoServer):
    def __init__(self, sdir, port, api=None):
        super().__init__("127.0.0.1", port, verbose=False)
        self._sdir = sdir
        self._api = api

    def _server_entry(self):
        app = fault_layer(DomainDispatcherApplication(create_backend_app), self._sdir,
                          self._api)
        self._server = tms.make_server(self._ip_address, self._port, app, True,
                                       request_handler=tms.MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


def warm_up(port):
    """The first EC2 call loads moto's AMI catalogue (~2 s): pay it before `up` returns."""
    import boto3
    kw = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
              aws_access_key_id="ec2sim", aws_secret_access_key="ec2sim")
    ec2 = boto3.client("ec2", **kw)
    ssm = boto3.client("ssm", **kw)
    for c in (ec2, ssm):
        c.meta.events.register("before-sign.*.*", _mark_internal)
    t = time.time()
    ec2.describe_availability_zones()
    print(f"warm-up: ec2 backend {time.time() - t:.1f}s", flush=True)
    t = time.time()
    ec2.describe_images(ImageIds=[ssm.get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    )["Parameter"]["Value"]])
    print(f"warm-up: ssm + image {time.time() - t:.1f}s", flush=True)


def _mark_internal(request, **_):
    request.headers["X-Ec2sim-Internal"] = "1"


def main():
    sdir = sys.argv[1]
    cfg = config.read_json(os.path.join(sdir, "config.json"))
    sim = runtime.Sim(sdir)
    statusview.TIMING = sim.timing.profile
    print(timing.table(cfg.get("timing") or timing.resolve(os.environ)), end="", flush=True)
    rules.install(sim)
    firewall.install(sim)  # after rules: wraps the backend as rules left it
    api = ebsdirect.install(sim)
    server = Server(sdir, cfg["port"], api)
    server.start()
    ebs = None
    if cfg.get("ebs_port"):
        ebs = ebsserver.Server(api, "127.0.0.1", cfg["ebs_port"])
        ebs.start()
    warm_up(cfg["port"])
    with open(os.path.join(sdir, "ready"), "w") as f:
        f.write(str(os.getpid()))
    print(f"ec2sim {cfg['name']} ready on port {cfg['port']} (EBS direct: "
          f"{cfg.get('ebs_port') or cfg['port']})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    # `down` unwinds the host resources from the ledger; the daemon only stops serving.
    if ebs is not None:
        ebs.stop()
    server.stop()
    time.sleep(0)


if __name__ == "__main__":
    main()
