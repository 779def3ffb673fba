# Guest side of direction (a): the kernel loads a COW store written by udm.
# /dev/vda = origin, /dev/vdb = COW; the driver prepends CHUNK=<n>.
SZ=$(cat /sys/block/vda/size)
dmc create snapk --table "0 $SZ snapshot /dev/vda /dev/vdb P $CHUNK" || { echo "ERROR create"; exit 1; }
echo "STATUS $(dmsetup status snapk | cut -d' ' -f4-)"
echo "TABLE $(dmsetup table snapk | cut -d' ' -f4-)"
echo "MD5 $(md5sum < /dev/mapper/snapk | cut -d' ' -f1)"
dmsetup remove snapk
