# common.sh: what the hand power-cut checks of tests/powerloss/ share. Source it (bash) from the
# repository root, with PORT_BASE set: it mounts LazyFS under a new directory $W, sets BIN (the
# forwarder), MOCK, SRC and ADM (PORT_BASE+1..3) and writes $W/conf.toml, whose [queue] is on
# LazyFS; QUEUE_EXTRA and INTAKE_EXTRA add lines to its tables.
set -u
BIN=${BIN:-target/release/sekoia-forwarder}
. "${POWERLOSS:-../shared/powerloss}/lib.sh"
W=$(mktemp -d)
lfs_start "$W/root" "$W/mnt" "$W/state" || exit 1
MOCK=127.0.0.1:$((PORT_BASE + 1)); SRC=127.0.0.1:$((PORT_BASE + 2)); ADM=127.0.0.1:$((PORT_BASE + 3))
cat > $W/conf.toml <<TOML
[queue]
path = "$W/mnt/q"
${QUEUE_EXTRA:-}
[intake]
url = "http://$MOCK"
linger_ms = 50
backoff_initial_ms = 50
backoff_max_ms = 1000
${INTAKE_EXTRA:-}
[[source]]
type = "http"
listen = "$SRC"
[admin]
listen = "$ADM"
TOML

# Waits (up to 2 minutes) until the forwarder is ready: its queue open (after a cut, sled
# replays its log through FUSE, which takes a while; /health answers before that).
wait_ready() {
  local i
  for i in $(seq 1 600); do curl -sf "http://$ADM/ready" >/dev/null && return 0; sleep 0.2; done
  echo "the forwarder did not become ready" >&2; return 1
}
