# Guest side of direction (a): the kernel loads a COW store written by udm.
# /dev/vda = origin, /dev/vdb = COW; the driver prepends CHUNK=<n>.
SZ=$(cat /sys/block/vda/size)
dmc create snapk --table "0 $SZ snapshot /dev/vda /dev/vdb P $CHUNK" || { echo "ERROR create"; exit 1; }
echo "STATUS $(dmsetup status snapk | cut -d' ' -f4-)"
echo "TABLE $(dmsetup table snapk | cut -d' ' -f4-)"
echo "MD5 $(md5sum < /dev/mapper/snapk | cut -d' ' -f1)"
dmsetup remove snapk
# Then the kernel merges the udm-written store back into the origin.
dmc create mrg --table "0 $SZ snapshot-merge /dev/vda /dev/vdb P $CHUNK" || { echo "ERROR create merge"; exit 1; }
i=0
while [ $i -lt 600 ]; do
  set -- $(dmsetup status mrg | cut -d' ' -f4- | tr '/' ' ')
  [ "$1" = "$3" ] && break
  sleep 0.2; i=$((i + 1))
done
echo "MERGESTATUS $(dmsetup status mrg | cut -d' ' -f4-)"
dmsetup remove mrg
sync
echo "MERGED $(md5sum < /dev/vda | cut -d' ' -f1)"
