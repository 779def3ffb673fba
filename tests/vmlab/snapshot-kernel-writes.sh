# Guest side of direction (b): the kernel writes a COW store (origin writes after taking the
# snapshot, plus a few snapshot writes); udm loads it afterwards.
# /dev/vda = origin, /dev/vdb = zeroed COW; the driver prepends CHUNK=<n> NCH=<chunks>.
SZ=$(cat /sys/block/vda/size)
dmc create snapk --table "0 $SZ snapshot /dev/vda /dev/vdb P $CHUNK" || { echo "ERROR create snap"; exit 1; }
dmc create orgk --table "0 $SZ snapshot-origin /dev/vda" || { echo "ERROR create origin"; exit 1; }
BS=$((CHUNK * 512))
# NCH consecutive chunks in one go (copies run in parallel and complete out of order) ...
dd if=/dev/urandom of=/dev/mapper/orgk bs=$BS seek=16 count=$NCH conv=fsync 2>/dev/null
# ... then scattered partial writes to the origin and to the snapshot.
i=1
while [ $i -le 40 ]; do
  s=$(( (i * 7919 * CHUNK + i * 3) % (SZ - 8) ))
  dd if=/dev/urandom of=/dev/mapper/orgk bs=512 seek=$s count=3 conv=fsync 2>/dev/null
  i=$((i + 1))
done
i=1
while [ $i -le 10 ]; do
  s=$(( (i * 104729 + 5) % (SZ - 8) ))
  dd if=/dev/urandom of=/dev/mapper/snapk bs=512 seek=$s count=5 conv=fsync 2>/dev/null
  i=$((i + 1))
done
sync
echo "STATUS $(dmsetup status snapk | cut -d' ' -f4-)"
echo "MD5 $(md5sum < /dev/mapper/snapk | cut -d' ' -f1)"
echo "ORIGIN $(md5sum < /dev/mapper/orgk | cut -d' ' -f1)"
dmsetup remove orgk
dmsetup remove snapk
sync
