# Runs inside the vmlab guest after commands.sh (appended by dmsetup-compare.sh as a function
# body): the session once with the kernel's dmsetup, then, on zeroed disks, with udmsetup
# against udmd serving /dev/vda and /dev/vdb as the disks vda and vdb. Prints each transcript
# between markers, and the kernel's block majors for the host's normalisation.
fresh() { dd if=/dev/zero of=/dev/vda bs=1M count=16 2>/dev/null; dd if=/dev/zero of=/dev/vdb bs=1M count=16 2>/dev/null; }
export LANG=C LC_ALL=C
echo "MAJOR_VIRTBLK $(awk '$2 == "virtblk" {print $1}' /proc/devices)"
echo "MAJOR_DM $(awk '$2 == "device-mapper" {print $1}' /proc/devices)"
echo "DMSETUP_VERSION $(dmsetup version | tr '\n' ' ')"
fresh
echo "@@TRANSCRIPT dmsetup"
DM=dmsetup session
echo "@@TRANSCRIPT-END"
dmsetup remove_all > /dev/null 2>&1
fresh
export UDM_RUNTIME_DIR=/run/udm UDM_STATE_DIR=/tmp/udm-state
udmd > /tmp/udmd.log 2>&1 &
for _ in $(seq 100); do [ -S /run/udm/control.sock ] && break; sleep 0.2; done
[ -S /run/udm/control.sock ] || { echo "FAIL udmd did not start"; cat /tmp/udmd.log; exit 1; }
udmsetup disk add vda --file /dev/vda > /dev/null || exit 1
udmsetup disk add vdb --file /dev/vdb > /dev/null || exit 1
echo "@@TRANSCRIPT udmsetup"
DM=udmsetup session
echo "@@TRANSCRIPT-END"
