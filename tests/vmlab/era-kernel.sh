# Guest side of era-crosscheck.sh; the driver prepends BS=<sectors> HISTORY='<steps>'.
# /dev/vda = metadata for the kernel's own history, /dev/vdb = origin, /dev/vdc = metadata
# udm wrote (loaded by the kernel in phase 2).
SZ=$(cat /sys/block/vdb/size)
st() { sleep 0.05; echo "STATUS $(dmsetup status "$1" | cut -d' ' -f4-)"; }
dmc create erak --table "0 $SZ era /dev/vda /dev/vdb $BS" || { echo "ERROR create"; exit 1; }
st erak
for s in $HISTORY; do
  # The digest a step or status kicked off finishes before the next step, as udm's era-tool
  # waits for its own: a write in the middle of a digest would commit part of it, and the
  # blocks each side allocates (the status line's used count) would depend on timing.
  sleep 0.05
  case $s in
    c) dmsetup message erak 0 checkpoint ;;
    t) dmsetup message erak 0 take_metadata_snap ;;
    d) dmsetup message erak 0 drop_metadata_snap ;;
    r) dmsetup suspend erak && dmsetup resume erak ;;
    w*) n=${s#w}
        dd if=/dev/zero of=/dev/mapper/erak bs=4096 seek=$((n * BS / 8)) count=1 conv=fsync 2>/dev/null \
          || echo "ERROR write $n"
        continue ;;
  esac || echo "ERROR step $s"
  st erak
done
dmsetup remove erak
# Phase 2: the kernel loads the metadata udm wrote for the same history.
dmc create erau --table "0 $SZ era /dev/vdc /dev/vdb $BS" || { echo "ERROR create on udm metadata"; exit 1; }
echo "LOADED $(dmsetup status erau | cut -d' ' -f4-)"
dmsetup remove erau
sync
