# One broad dmsetup session, run in the vmlab guest (busybox sh) once with DM=dmsetup against the
# kernel and once with DM=udmsetup against udmd (tests/vmlab/dmsetup-compare.sh). Backing devices:
# /dev/vda and /dev/vdb (16 MiB each; udmd serves them as the disks vda and vdb). Every command is
# echoed with the tool written as "dmsetup", then its stdout, its stderr lines prefixed "E: " and
# a non-zero exit status as "rc=N". The two transcripts must be equal after compare.sh's
# normalisation. Keep each command independent of timing (no I/O racing a status).
: "${DM:?DM=dmsetup or udmsetup}"
t() {
  echo "\$ dmsetup $*"
  "$DM" "$@" > /tmp/cmd.out 2> /tmp/cmd.err
  rc=$?
  cat /tmp/cmd.out
  sed 's/^/E: /' /tmp/cmd.err
  [ $rc = 0 ] || echo "rc=$rc"
  # dmsetup without udev leaves /dev/mapper to the caller; udm resolves /dev/mapper/NAME itself.
  [ "$DM" != dmsetup ] || dmsetup mknodes > /dev/null 2>&1
}
# Tables with more than one line, given on stdin.
tin() {
  echo "\$ dmsetup $* <<EOF"; cat > /tmp/cmd.in; cat /tmp/cmd.in; echo "EOF"
  "$DM" "$@" < /tmp/cmd.in > /tmp/cmd.out 2> /tmp/cmd.err
  rc=$?
  cat /tmp/cmd.out
  sed 's/^/E: /' /tmp/cmd.err
  [ $rc = 0 ] || echo "rc=$rc"
  [ "$DM" != dmsetup ] || dmsetup mknodes > /dev/null 2>&1
}

echo "## no devices"
t ls
t ls --tree
t info
t table
t status
t deps

echo "## every target"
t create lin --table "0 2048 linear /dev/vda 0"
tin create lin2 <<T
0 1024 linear /dev/vda 2048
1024 1024 linear /dev/vdb 0
T
t create str --table "0 4096 striped 2 8 /dev/vda 4096 /dev/vdb 4096"
t create z --table "0 2048 zero"
t create e --table "0 2048 error"
t create dly --table "0 2048 delay /dev/vda 8192 0"
t create dly6 --table "0 2048 delay /dev/vda 8192 0 /dev/vdb 8192 5"
t create dly9 --table "0 2048 delay /dev/vda 8192 0 /dev/vdb 8192 5 /dev/vda 8192 7"
t create fl --table "0 2048 flakey /dev/vdb 2048 60 0"
t create fl1 --table "0 2048 flakey /dev/vdb 2048 60 0 1 drop_writes"
t create fl2 --table "0 2048 flakey /dev/vdb 2048 60 5 1 error_writes"
t create fl5 --table "0 2048 flakey /dev/vdb 2048 60 5 5 corrupt_bio_byte 32 w 1 0"
t create -r ro --table "0 1024 linear /dev/vda 1024"
t create -u UUID-ONE uu --table "0 8 zero"
t create nt -n
t create nt2 --notable -u UUID-TWO
t create top --table "0 1024 linear /dev/mapper/lin 512"
t create base --table "0 4096 linear /dev/vda 16384"
t create cow --table "0 4096 linear /dev/vdb 16384"
t create org --table "0 4096 snapshot-origin /dev/mapper/base"
t create snap --table "0 4096 snapshot /dev/mapper/base /dev/mapper/cow P 8"
t create cow2 --table "0 4096 linear /dev/vdb 24576"
t create snapn --table "0 4096 snapshot /dev/mapper/base /dev/mapper/cow2 N 16"
t create badsnap --table "0 4096 snapshot /dev/mapper/base /dev/vdb 24576 N 16"

echo "## listing"
t ls
t ls --target linear
t ls --target snapshot
t ls --target nosuch
t ls -o devname
t ls -o blkdevname
t ls --tree
t ls --tree -o ascii
t ls --tree -o ascii,inverted
t ls --tree -o ascii,compact
t ls --tree -o ascii,blkdevname
t ls --tree -o ascii,nodevice
t ls --tree -o ascii,active,open,rw,uuid
t ls --tree -o ascii,notrunc,device

echo "## info"
t info lin
t info nt
t info uu
t info ro
t info lin2 z
t info
t info -c
t info -C
t info -c lin nt
t info -c -o name,attr,segments
t info -c -o +devno
t info -c -o name,uuid,read_ahead,attr,tables_loaded,suspended,readonly,devno,major,minor,open,segments,events
t info -c -o name,blkdevname
t info -c --noheadings
t info -c --noheadings -o name,segments
t info -c --separator , -o name,attr
t info -c --noheadings --separator " | " -o name,uuid

echo "## deps"
t deps lin
t deps lin2
t deps top
t deps nt
t deps z
t deps
t deps -o devno lin2
t deps -o devname
t deps -o blkdevname lin2 top
t deps -o devname,blkdevname top

echo "## table and status"
t table
t table lin2
t table nt
t table --target linear
t table --target delay
t table --showkeys fl5
t table --concise
t table --concise lin2
t table --concise nt
t table --concise uu nt
t status
t status lin2 str
t status --target snapshot
t status nt
t status --noflush snap

echo "## targets"
t targets

echo "## load, clear, reload, suspend, resume"
t load lin --table "0 4096 linear /dev/vda 0"
t info lin
t info -c lin
t table --inactive lin
t status --inactive lin
t deps --inactive lin
t clear lin
t info lin
t table --inactive lin
t reload lin --table "0 3072 linear /dev/vdb 0"
t suspend lin
t info lin
t info -c -o name,attr,suspended lin
t suspend lin
t resume lin
t resume lin
t info lin
t table lin
t deps lin
t load nt --table "0 64 zero"
t info nt
t table nt
t table --inactive nt
t table --concise nt
t resume nt
t info nt
t table --concise nt
t suspend --nolockfs --noflush z
t info -c -o name,attr z
t resume --noflush --nolockfs z
t load -r z --table "0 2048 zero"
t resume z
t info z
t -v suspend e
t -v resume e
t load top --table "0 1024 error"
t deps top
t deps --inactive top
t clear top

echo "## rename, uuid, wait, message"
t rename z zz
t info zz
t rename zz --setuuid UUID-ZZ
t info zz
t -u UUID-ZZ info
t -u UUID-ZZ table
# Not compared: `rename -u UUID NEW`. udm renames the device with that uuid; the kernel's
# DM_DEV_RENAME looks the device up by name only and fails with ENXIO (a udm extension).
t rename zz z3
t ls
t wait z3 99
t -v wait z3 99
t wait --noflush z3 99
t message lin 0 hello
t message snap 0 hello

echo "## concise create, table files, deferred remove"
t create --concise "c1,,,,0 8 zero;c2,UUID-C2,,ro,0 8 zero,8 8 error"
t table --concise c1 c2
t info c2
printf '0 16 zero\n' > /tmp/table.txt
t load c1 /tmp/table.txt
t resume c1
t table c1
t create c3 /tmp/table.txt
t table c3
t create dfr --table "0 8 linear /dev/mapper/c1 0"
t remove --deferred c1
t info c1
t info -c -o name,attr,open c1
t message c1 0 @cancel_deferred_remove
t info c1
t remove --deferred c1
t remove dfr
t ls
t remove c2 c3
t ls --tree -o utf
t ls --tree -o vt100

echo "## errors"
t info missing
t info -c missing
t table missing
t status missing
t deps missing
t ls --target missing
t create lin --table "0 8 zero"
t create -u UUID-ONE dupuuid --table "0 8 zero"
t create badt --table "0 8 nosuch"
t create bada --table "0 8 linear /dev/vda"
t create gap --table "8 8 zero"
t create big --table "0 99999999 linear /dev/vda 0"
t load lin --table "0 8 linear"
t load missing --table "0 8 zero"
t rename lin z3
t rename missing other
t rename uu --setuuid UUID-NEW
t suspend missing
t resume missing
t clear missing
t remove missing
t message missing 0 x
t wait missing 1
t remove lin
t remove -f lin
t table lin
t info -c -o name,attr,open,segments lin
t -u NO-SUCH-UUID info

echo "## verbose reads"
t -v table lin2
t -v status z3
t -v deps top
t -v info -c z3

echo "## remove"
t remove top
t remove snap snapn snapx
t remove org
t remove --retry cow cow2
t remove -f base
t remove --deferred e
t ls
t remove lin lin2 str z3 dly dly6 dly9 fl fl1 fl2 fl5 ro uu nt nt2
t ls
t info
t ls --tree
echo "## end"
