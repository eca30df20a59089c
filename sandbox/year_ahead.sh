#!/usr/bin/env bash
# Run the pytest suite with the wall clock moved ahead (default: one year), end to end.
#
#   make year-ahead                          # +365d, the whole suite (pytest -q)
#   sandbox/year_ahead.sh +400d tests/e2e -x -q
#   OFFSET is libfaketime's relative form (+365d, +400d, +9000h ...); the rest goes to pytest.
#
# How: libfaketime (Debian's libfaketime) moves CLOCK_REALTIME only (FAKETIME_DONT_FAKE_MONOTONIC=1,
# as a moved system clock would: the monotonic clock does not move). Two things are needed for that:
#  * With the monotonic clock faked (libfaketime's default), every Python wait with a timeout
#    (Event.wait, Queue.get(timeout=...), Lock.acquire(timeout=...)) blocks for ~58 years: CPython
#    computes the deadline from the faked clock_gettime(CLOCK_MONOTONIC) and hands it to glibc's
#    sem_clockwait(), which libfaketime 0.9.10 does not intercept, so the kernel waits until real
#    monotonic time reaches the faked value. That is the `airflow dags test` "hang".
#  * With FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 still shifts absolute deadlines on the
#    monotonic clock by the fake offset: clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) gets a
#    negative time (EINVAL: Python's time.sleep() raises "OSError: [Errno 22] Invalid argument"), and
#    pthread_cond_timedwait() on a CLOCK_MONOTONIC condvar returns at once (CPython's GIL waits 5 ms
#    that way: the GIL ping-pongs, half the CPU goes to the kernel, and the e2e stand-in/senders get
#    slow enough to hit their 2 s read timeout). A tiny shim, preloaded before libfaketime, sends
#    those monotonic waits straight to glibc/the kernel.
# The Airflow scheduler compares the times it computes (faked) with the metadata DB server's now()
# (DagModel.dags_needing_dagruns, DagRun.get_running_dag_runs_to_examine and
# get_queued_dag_runs_to_set_running), so the shared PostgreSQL server (real clock) cannot be used: a
# private PostgreSQL cluster is started under the same faked clock, on PGPORT, and named to the suite
# by BLUESHIFT_TEST_PG. MariaDB stays the shared server (the code only binds times from Python).
set -euo pipefail

OFFSET=${1:-+365d}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- -q
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIBFAKETIME=${LIBFAKETIME:-/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
PGPORT=${PGPORT:-55432}
PGUSER_OS=${PGUSER_OS:-postgres}  # initdb/postgres refuse to run as root

if [ ! -e "$LIBFAKETIME" ]; then
  echo "Installing libfaketime ..."
  apt-get install -y libfaketime >/dev/null || { apt-get update >/dev/null && apt-get install -y libfaketime >/dev/null; }
fi
# Installed with the real clock (TLS certificates, pip caches).
make -C "$ROOT" --no-print-directory install warehouses

WORK=$(mktemp -d /tmp/year-ahead.XXXXXX)
chmod 755 "$WORK"
PG_STARTED=
cleanup() {
  if [ -n "$PG_STARTED" ]; then
    as_pg "'$PGBIN/pg_ctl' -D '$WORK/pg/data' -m fast -w -t 60 stop" >/dev/null 2>&1 ||
      as_pg "'$PGBIN/pg_ctl' -D '$WORK/pg/data' -m immediate stop" >/dev/null 2>&1 || true
    # libfaketime's shared memory of the server processes, which they leave behind
    find /dev/shm -maxdepth 1 -user "$PGUSER_OS" -newer "$WORK/started" \
      \( -name 'faketime_shm_*' -o -name 'sem.faketime_sem_*' \) -delete 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
as_pg() {  # run a shell command as the PostgreSQL OS user (or as is, when not root)
  if [ "$(id -u)" = 0 ]; then su "$PGUSER_OS" -s /bin/sh -c "$1"; else sh -c "$1"; fi
}

cat >"$WORK/monotonic_sleep_shim.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* With FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 still shifts absolute deadlines on the
 * monotonic clock by the fake offset. These two calls take such deadlines; the monotonic ones go
 * straight to glibc/the kernel, everything else on to libfaketime. */
int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem)
{
    if (clock_id == CLOCK_MONOTONIC || clock_id == CLOCK_MONOTONIC_RAW || clock_id == CLOCK_BOOTTIME)
        return syscall(SYS_clock_nanosleep, clock_id, flags, req, rem) == 0 ? 0 : errno;
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (!next)
        next = dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock_id, flags, req, rem);
}

int pthread_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex, const struct timespec *abstime)
{
    /* glibc >= 2.25 keeps the condvar's clock in bit 1 of __wrefs (1: CLOCK_MONOTONIC). */
    if (cond->__data.__wrefs & 2)
        return pthread_cond_clockwait(cond, mutex, CLOCK_MONOTONIC, abstime);
    static int (*next)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);
    if (!next)
        next = dlsym(RTLD_NEXT, "pthread_cond_timedwait");
    return next(cond, mutex, abstime);
}
EOF
cc -O2 -shared -fPIC -o "$WORK/monotonic_sleep_shim.so" "$WORK/monotonic_sleep_shim.c" -ldl -lpthread

FAKE_ENV="LD_PRELOAD='$WORK/monotonic_sleep_shim.so $LIBFAKETIME' FAKETIME='$OFFSET' FAKETIME_DONT_FAKE_MONOTONIC=1"

# A private PostgreSQL cluster whose now() is the faked clock (trust auth, fsync off: throw-away).
touch "$WORK/started"
PG="$WORK/pg"  # data directory, log and socket, owned by the PostgreSQL OS user
mkdir -p "$PG" && { [ "$(id -u)" != 0 ] || chown "$PGUSER_OS" "$PG"; }
as_pg "'$PGBIN/initdb' -D '$PG/data' -U postgres --auth=trust -E UTF8 --no-sync >'$PG/initdb.log' 2>&1" ||
  { cat "$PG/initdb.log"; exit 1; }
as_pg "env $FAKE_ENV '$PGBIN/pg_ctl' -D '$PG/data' -l '$PG/server.log' -w -t 120 start -o \
  \"-p $PGPORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$PG' -c max_connections=300 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off\"" >/dev/null ||
  { cat "$PG/server.log"; exit 1; }
PG_STARTED=1

export LD_PRELOAD="$WORK/monotonic_sleep_shim.so $LIBFAKETIME" FAKETIME="$OFFSET" FAKETIME_DONT_FAKE_MONOTONIC=1
export BLUESHIFT_TEST_PG="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
cd "$ROOT"
echo "Real clock:   $(LD_PRELOAD= date -u '+%F %T')"
echo "Faked clock:  $(date -u '+%F %T') (FAKETIME=$OFFSET); Python: $(.venv/bin/python -c \
  'import datetime, time; t = time.monotonic(); time.sleep(0.1); print(datetime.datetime.now(datetime.timezone.utc), "sleep ok")')"
echo "PostgreSQL:   now() = $(.venv/bin/python -c 'import os, psycopg; print(psycopg.connect(os.environ["BLUESHIFT_TEST_PG"]).execute("select now()").fetchone()[0])') ($BLUESHIFT_TEST_PG)"
echo "pytest $*"
start=$(date +%s)
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
echo "pytest exit $rc after $(( $(date +%s) - start )) s (FAKETIME=$OFFSET)"
exit $rc
