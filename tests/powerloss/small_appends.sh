#!/bin/bash
# Hand check, not run by CI (needs root, /dev/fuse and LazyFS: ../shared/powerloss/README.md).
# A commit of a few appends alone is applied to sled key by key, chunks before the lane records
# that count them (docs/reliability.md, "Appends applied key by key"). A simulated power cut in
# the middle of such commits must lose no event acknowledged to its sender; chunks past their
# record's count are counted in at the next open and delivered. 8 senders of single-event
# requests (commits of ~9 writes) to a slow intake (a backlog to count), a cut once about 6,000
# are acknowledged; then a restart, and a count: acknowledged, delivered, missing (must be 0),
# delivered but never acknowledged (the cut-short commits: allowed), duplicated. LazyFS drops
# every unsynced byte, so a cut leaves no part of a commit after the last fsync: this checks
# that the key-by-key path loses nothing acknowledged; the cut-short state itself (chunks on
# disk, their records not) is made by tests/crash.rs,
# crash_between_an_appends_chunks_and_its_lane_records.
# Usage: LAZYFS_BIN=... POWERLOSS=/path/to/shared/powerloss tests/powerloss/small_appends.sh
# (from the repository root; fixed local ports 47631-47633)
PORT_BASE=47630
QUEUE_EXTRA=""
INTAKE_EXTRA=""
. "$(dirname "$0")/common.sh"
start_mock --keep-events 1000000
mock_faults '{"delay_ms": 200}'
start_forwarder fwd1.log
# Each sender records the event of each request answered 200 (acknowledged: durable).
python3 - "$SRC" "$W" <<'PY' &
import sys, threading, requests
src, w = sys.argv[1], sys.argv[2]
def send(t):
    s = requests.Session()
    with open(f"{w}/acked-{t}", "w") as acked:
        for i in range(100000):
            event = f"sa-{t}-{i:06} " + "x" * 150
            try:
                resp = s.post(f"http://{src}/jsons", json=[event], timeout=10,
                              headers={"X-SEKOIAIO-INTAKE-KEY": "0123456789abcdef0123456789abcdef"})
            except requests.RequestException:
                return
            if resp.status_code == 200:
                acked.write(event.split()[0] + "\n"); acked.flush()
threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
for t in threads: t.start()
for t in threads: t.join()
PY
SENDER=$!
for i in $(seq 1 600); do
  n=$(cat $W/acked-* 2>/dev/null | wc -l)
  [ "${n:-0}" -ge 6000 ] && break; sleep 0.1
done
echo "acknowledged before the cut: $n"
lfs_powerloss "$W/state" $PID
wait $SENDER
mock_faults '{}'
start_forwarder fwd2.log
grep -h "cut short" $W/fwd2.log
wait_drained
count_delivered $W/acked-*
kill $PID; wait $PID; kill $MP
lfs_stop "$W/state" nockpt
