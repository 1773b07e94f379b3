#!/usr/bin/env bash
# What tests need from the system: sshd and rsync for tests/test_cluster.py's real `ray up`, and
# Chromium for tests/test_mlflow_ui.py's look at the MLflow UI. `make test` runs this first. As root
# with apt it installs what is missing; otherwise it says once what is missing, and those tests skip
# (CI=true makes them fail instead, so CI always runs them). Never fails itself.
missing=()
test -x /usr/sbin/sshd || missing+=(openssh-server)
command -v rsync >/dev/null || missing+=(rsync)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
if [ ${#missing[@]} = 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} for the loopback \`ray up\` and browser tests (apt-get, a minute or two)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        exit 0
    fi
    echo "apt-get could not install ${missing[*]}: the tests that need them will skip"
else
    echo "${missing[*]} missing and this is not root with apt: the loopback \`ray up\` or browser test will skip" \
         "(install them, e.g. \`sudo apt-get install ${missing[*]}\`, or run \`sudo make test\`, to run them)"
fi
exit 0
