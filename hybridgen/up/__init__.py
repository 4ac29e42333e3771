"""`hybridgen up`: the all-in-one local launcher, with supervision.

It starts the embedded nats-server (data under `$HG_HOME`), then each child command in
order with `HG_NATS_URL` pointing at it, and supervises them: a child that dies (any exit
the launcher did not ask for) is reported -- a log line and a `child_exited` event on
`hg.events.launcher.<id>` -- and restarted with exponential back-off (`child_restarted`),
while the other children keep serving. A dead nats-server is restarted on the same port and
store; clients reconnect by themselves. Only Ctrl-C/SIGTERM (or leaving the foreground
console) stops everything: children get SIGTERM in reverse start order and a bounded time to
drain, then SIGKILL, and the broker stops last.

The rooms:
- `spec`: what a child is (`ChildSpec`) and its readiness check (`http_ready`);
- `bus`: the broker `up` runs, secure by default (a user per service, role permissions,
  TLS beyond loopback), and the credentials each child gets;
- `supervisor`: the `Launcher`: start in order, restart with back-off, stop in reverse;
- `children`: the services `up` runs by default (workers, the cloud API, edges, the
  console) and their drain bounds;
- `bootstrap`: the default model set, built on first run;
- `tell`: what `up` prints about the running network, and its log file;
- `cli`: the `hybridgen up` arguments and `main`.
"""

import logging

#: The launcher's own log lines, under one name whichever room writes them (`launcher.log`
#: and log filters know it by this name).
log = logging.getLogger("hybridgen.launcher")
