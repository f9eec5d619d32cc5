#!/bin/bash
# Hand check, not run by CI (needs root, /dev/fuse and LazyFS: ../shared/powerloss/README.md).
# A file source's checkpoints are written in the same commit as the lines read up to them
# (docs/reliability.md, "Syslog and files"). A writer appends 60,000 numbered lines to a log
# file (on an ordinary disk: the file is not what is cut) and rotates it by rename every 15,000;
# the forwarder tails it into a queue on LazyFS while the intake refuses everything; a simulated
# power cut once about a third is queued; then a restart (the writer still writing), the intake
# working again once the writer is done, and a count:
# lines written, delivered, missing (must be 0), duplicates (must be 0: nothing was delivered
# before the cut, so no delivery retry can explain one).
# Usage: LAZYFS_BIN=... POWERLOSS=/path/to/shared/powerloss tests/powerloss/file_checkpoints.sh
# (from the repository root; fixed local ports 47631-47633). PATTERN (default `app.log*`, which
# also matches the rotated files) is the source's pattern in the log directory: with `app.log`
# alone, a file created and rotated away while the forwarder is down is never seen (lost).
# OVERSIZE_EVERY=N makes every Nth line 600 bytes long, over the source's max_event_bytes = 256
# with oversize = "dead_letter": such a line is stored as a dead letter in a commit of its own
# before the commit that moves the checkpoint past it, so a cut between the two must keep it
# (twice at most), never lose it; the script then also counts the dead letters by line name:
# long lines written, dead letters distinct, missing (must be 0), kept twice.
PORT_BASE=47630
QUEUE_EXTRA="generation_bytes = 4194304"
. "$(dirname "$0")/common.sh"
mkdir -p "$W/logs"
cat >> $W/conf.toml <<TOML
[[source]]
type = "file"
paths = ["$W/logs/${PATTERN:-app.log*}"]
read_from = "beginning"
intake_key = "0123456789abcdef0123456789abcdef"
scan_interval_ms = 50
poll_interval_ms = 10
rotate_wait_ms = 500
TOML
if [ -n "${OVERSIZE_EVERY:-}" ]; then
  printf 'max_event_bytes = 256\noversize = "dead_letter"\n' >> $W/conf.toml
fi
file_accepted() {
  curl -s http://$ADM/status | python3 -c "import json,sys; print(json.load(sys.stdin)['file_sources'][0]['accepted_events'])" 2>/dev/null
}
start_mock --keep-events 1000000
mock_faults '{"script": [{"fault": "status", "status": 503, "times": 100000000}]}'
touch "$W/logs/app.log"
start_forwarder fwd1.log
# The writer: 60,000 lines of ~150 bytes (every OVERSIZE_EVERY-th of 600), 50 a write, renamed
# to app.log.N every 15,000; every line's name goes to $W/written (the long ones' to $W/long)
# once it is written.
python3 - "$W/logs" "$W/written" "$W/long" "${OVERSIZE_EVERY:-0}" <<'PY' &
import os, sys, time
logs, out, long_out, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
log = os.path.join(logs, "app.log")
f = open(log, "a")
names, long_names = [], []
for i in range(60000):
    if every and i % every == every - 1:
        long_names.append(f"fl-{i:08}")
        f.write(f"fl-{i:08} " + "y" * 590 + "\n")
    else:
        names.append(f"fl-{i:08}")
        f.write(f"fl-{i:08} " + "z" * 140 + "\n")
    if i % 50 == 49:
        f.flush()
        time.sleep(0.01)
    if i % 15000 == 14999:
        f.close()
        os.rename(log, os.path.join(logs, f"app.log.{i // 15000 + 1}"))
        f = open(log, "a")
f.close()
open(out, "w").write("\n".join(names) + "\n")
open(long_out, "w").write("".join(n + "\n" for n in long_names))
PY
WRITER=$!
for i in $(seq 1 1200); do
  n=$(file_accepted)
  [ "${n:-0}" -ge 20000 ] && break; sleep 0.1
done
echo "queued before the cut: $n"
lfs_powerloss "$W/state" $PID
start_forwarder fwd2.log
wait $WRITER
mock_faults '{}'
for i in $(seq 1 1200); do
  n=$(file_accepted)
  [ "${n:-0}" -gt 0 ] && break; sleep 0.1
done
# Lines queued after the restart, and the queue drained.
EXPECTED=$(wc -l < "$W/written")
for i in $(seq 1 600); do
  got=$(curl -s http://$MOCK/_mock/stats | python3 -c "import json,sys; print(json.load(sys.stdin)['accepted_events'])" 2>/dev/null)
  [ "${got:-0}" -ge "$EXPECTED" ] && break; sleep 0.2
done
wait_drained
echo "queued after the restart: $(file_accepted)"
count_delivered "$W/written"
if [ -n "${OVERSIZE_EVERY:-}" ]; then
  curl -s http://$ADM/dead-letters > $W/dead.json
  python3 - "$W/dead.json" "$W/long" <<'PY'
import sys, json, collections
kept = collections.Counter(d["event"].split()[0] for d in json.load(open(sys.argv[1])))
long = set(open(sys.argv[2]).read().split())
print(f"long lines {len(long)}, dead letters {len(kept)} distinct, missing "
      f"{len(long - set(kept))}, not written {len(set(kept) - long)}, "
      f"kept twice {sum(c - 1 for c in kept.values() if c > 1)}")
PY
fi
grep -E "reading file|rotated|checkpoint" $W/fwd2.log | head -8
kill $PID; wait $PID; kill $MP
lfs_stop "$W/state" nockpt
