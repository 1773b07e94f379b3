#!/usr/bin/env bash
# What tests/test_cluster.py's real `ray up` needs from the system: sshd and rsync. `make test`
# runs this first. As root with apt it installs them; otherwise it says once what is missing, and
# that one test skips (CI=true makes it fail instead, so CI always runs it). Never fails itself.
if test -x /usr/sbin/sshd && command -v rsync >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing openssh-server and rsync for tests/test_cluster.py's loopback \`ray up\` (apt-get, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends openssh-server rsync >/dev/null; then
        exit 0
    fi
    echo "apt-get could not install openssh-server and rsync: the loopback \`ray up\` test will skip"
else
    echo "openssh-server or rsync is missing and this is not root with apt: the loopback \`ray up\` test will skip" \
         "(install them, e.g. \`sudo apt-get install openssh-server rsync\`, or run \`sudo make test\`, to run it)"
fi
exit 0
