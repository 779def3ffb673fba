#!/bin/sh
# Kernel dm-era first-write cost (peer figure for udm's era): fio direct I/O on the bare disk,
# then on an era device over it right after a checkpoint (each write the first to its 64K block)
# and again (rewrites).
ORIG=/dev/vda; META=/dev/vdb
SZ=$(blockdev --getsz $ORIG)
dd if=/dev/zero of=$META bs=4k count=16 2>/dev/null
dmc create era --table "0 $SZ era $META $ORIG 128" || exit 1
f() { # label dev rw bs qd offset
  fio --name=$1 --filename=$2 --ioengine=libaio --direct=1 --rw=$3 --bs=$4 --iodepth=$5 --offset=$6 --size=128M --output=/tmp/o.txt >/dev/null 2>&1
  echo "RESULT $1 $(grep -m1 'write: IOPS=' /tmp/o.txt | sed 's/.*IOPS=\([^,]*\),.*/\1/') $(grep -m1 'clat.*usec\|clat.*msec' /tmp/o.txt)" 
}
for r in 1 2; do
f plain-64k-seq-qd8 $ORIG write 64k 8 0
dmsetup message era 0 checkpoint
f era-first-64k-seq-qd8 /dev/mapper/era write 64k 8 128M
f era-rewrite-64k-seq-qd8 /dev/mapper/era write 64k 8 128M
f plain-4k-stride-qd16 $ORIG write:60k 4k 16 0
dmsetup message era 0 checkpoint
f era-first-4k-stride-qd16 /dev/mapper/era write:60k 4k 16 256M
f era-rewrite-4k-stride-qd16 /dev/mapper/era write:60k 4k 16 256M
done
dmsetup status era
