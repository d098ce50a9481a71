# Sourced by bench-io.sh and ab.sh: installs fio and mkfs.ext4 if missing
# and loads the loop and fuse modules where they are modules.
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if ((${#missing[@]})); then
	echo "bench-io: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[ -e /dev/loop-control ] || modprobe loop || true
[ -e /dev/fuse ] || modprobe fuse || true
