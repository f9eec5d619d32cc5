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

# Starts the mock intake on $MOCK (PID in MP; extra arguments go to it) and waits for it.
start_mock() {
  local i
  $BIN mock-intake --listen $MOCK --quiet "$@" > $W/mock.log 2>&1 & MP=$!
  for i in $(seq 1 50); do curl -sf http://$MOCK/_mock/stats >/dev/null && return 0; sleep 0.2; done
  echo "the mock intake did not start" >&2; return 1
}

# Sets the mock's faults (a JSON object; '{}' clears them).
mock_faults() {
  curl -s -X PUT http://$MOCK/_mock/faults -d "$1" >/dev/null
}

# Starts the forwarder on $W/conf.toml, its log in $W/$1 (PID in PID), and waits until ready.
start_forwarder() {
  $BIN run --config $W/conf.toml > "$W/$1" 2>&1 & PID=$!
  wait_ready
}

# Waits (up to 2 minutes) until the forwarder's queue holds no event.
wait_drained() {
  local i q
  for i in $(seq 1 600); do
    q=$(curl -s http://$ADM/status | python3 -c "import json,sys; print(json.load(sys.stdin)['queue']['events'])" 2>/dev/null)
    [ "$q" = 0 ] && return 0; sleep 0.2
  done
  echo "the queue did not drain" >&2; return 1
}

# Prints what the mock received against the event names in the files given (one per line,
# the first word of each event): acknowledged (the first file), delivered, missing (must be
# 0), delivered but not acknowledged, duplicates.
count_delivered() {
  curl -s http://$MOCK/_mock/events > $W/events.json
  python3 - "$W/events.json" "$@" <<'PY'
import sys, json, collections
got = collections.Counter(e["raw"].split()[0] for e in json.load(open(sys.argv[1])))
acked = set()
for name in sys.argv[2:]:
    acked |= set(open(name).read().split())
missing = acked - set(got)
unacked = set(got) - acked
dups = sum(c - 1 for c in got.values() if c > 1)
print(f"acknowledged {len(acked)}, delivered {len(got)} distinct, missing {len(missing)}, "
      f"delivered but not acknowledged {len(unacked)}, duplicates {dups}")
PY
}
