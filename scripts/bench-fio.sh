# Sourced by the bench-*.sh scripts: fio runs whose failures stop the benchmark, and a verified
# pass per job, so a server that returns wrong data or errors cannot report a good figure.
#   fio_json OUT ARGS...   fio ARGS with JSON output to OUT; exits the script (status 1, fio's
#                          log printed) when fio fails or a job reports an error
#   fio_verify URI RW BS DEPTH [SIZE]
#                          writes SIZE (default 64M) with RW/BS/DEPTH through the nbd engine,
#                          then reads it back checking crc32c (verify_fatal); exits on failure
fio_json() {
  local out=$1; shift
  local log=$out.log
  if ! fio "$@" --output-format=json --output="$out" >"$log" 2>&1; then
    echo "$(basename "$0"): fio failed: fio $*" >&2; cat "$log" "$out" >&2 2>/dev/null; exit 1
  fi
  if [ "$(jq '[.jobs[].error] | max' "$out")" != 0 ]; then
    echo "$(basename "$0"): fio job error: fio $*" >&2; cat "$out" >&2; exit 1
  fi
}
fio_verify() {
  local uri=$1 rw=$2 bs=$3 depth=$4 size=${5:-64M}
  case $rw in *read*) rw=${rw/read/write} ;; esac
  local log
  log=$(mktemp)
  if ! fio --name=verify --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$depth" \
      --size="$size" --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 >"$log" 2>&1; then
    echo "$(basename "$0"): VERIFY FAILED ($rw $bs on $uri):" >&2; cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
}
