#!/bin/sh
# ec2sim power shim. boot.sh binds this file over every poweroff, shutdown, halt, reboot,
# systemctl, telinit and init on an instance's PATH (in the instance's own mount namespace,
# so the host's files are untouched). It never runs a host program and never talks to an
# init: it only writes the request into the FIFO /run/ec2sim/power, which the simulator
# daemon reads; the daemon then stops the instance from outside, as a hypervisor would, with
# the instance's InstanceInitiatedShutdownBehavior (terminate or stop; reboot restarts it).
name=${0##*/}
action=poweroff
case "${1:-}" in --help) echo "usage: $name (ec2sim power shim)"; exit 0 ;; esac
case $name in
  poweroff|halt) ;;  # halt powers off too: on EC2 a halted instance does not stay up
  reboot) action=reboot ;;
  shutdown)
    for a in "$@"; do
      case $a in
        -r|--reboot) action=reboot ;;
        -c) echo "shutdown: no scheduled shutdown to cancel." >&2; exit 1 ;;
      esac
    done ;;  # any time given (+5, hh:mm) means now: nothing here waits for a schedule
  systemctl)
    verb=
    for a in "$@"; do case $a in -*) ;; *) verb=$a; break ;; esac; done
    case $verb in
      poweroff|halt) ;;
      reboot|kexec|soft-reboot) action=reboot ;;
      *)  # what the real systemctl says where systemd is not PID 1 (as in containers)
        echo "System has not been booted with systemd as init system (PID 1). Can't operate." >&2
        echo "Failed to connect to bus: Host is down" >&2
        exit 1 ;;
    esac ;;
  init|telinit)
    case "${1:-}" in
      0) ;;
      6) action=reboot ;;
      *) echo "$name: only runlevels 0 and 6 are simulated." >&2; exit 1 ;;
    esac ;;
esac
if [ "$(id -u)" != 0 ]; then
  echo "$name: must be superuser." >&2
  exit 1
fi
if [ ! -p /run/ec2sim/power ]; then
  echo "$name: this instance has no power control (simulator gone?)." >&2
  exit 1
fi
# Open read-write (<>): that never blocks, even if no daemon reads the FIFO any more.
{ echo "$action" >&3; } 3<>/run/ec2sim/power
