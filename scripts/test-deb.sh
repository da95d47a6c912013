#!/usr/bin/env bash
# Package tests (CI runs them from scripts/test.sh): build the .deb; check its files, modes and
# conffiles; install it with dpkg; check the user, permissions, the unit (systemd-analyze verify and
# security) and the installed `qsysd --check-config`; upgrade with an edited config; remove; purge;
# and lintian. Needs root (dpkg). Touches only the qsysd package and a sentinel database.
set -euo pipefail
cd "$(dirname "$0")/.."
# A failed check still ends with the count line that the test command adds up.
fail() {
  echo "test-deb: FAIL: $*" >&2
  echo "test-deb: ${passed:-0} passed, 1 failed"
  exit 1
}
# dpkg refuses to run while another package operation holds its lock: wait for it (2 minutes).
dpkg_() {
  local out
  for _ in $(seq 60); do
    if out=$(dpkg "$@" 2>&1); then return 0; fi
    grep -q 'lock' <<<"$out" || { echo "$out" >&2; return 1; }
    sleep 2
  done
  echo "$out" >&2
  return 1
}
passed=0
ok() { echo "test-deb: ok: $*"; passed=$((passed + 1)); }

[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg -i)"
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

bash scripts/deb.sh
built=$(ls -1t target/debian/qsysd_*.deb | head -1)
# cargo-deb clears its output directory on the next run (the upgrade build below); keep a copy
# where lintian (which drops root privileges) can read it.
work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
deb=$work/$(basename "$built")
cp "$built" "$deb"
chmod 644 "$deb"
echo "test-deb: $deb"

# Contents and modes.
listing=$(dpkg-deb -c "$deb")
unit=$(awk '{print $6}' <<<"$listing" | grep -E '/systemd/system/qsysd\.service$' || true)
[ -n "$unit" ] || fail "no systemd unit in the package"
for f in ./usr/bin/qsysd ./usr/bin/qsys-push ./etc/qsysd.toml ./usr/lib/sysusers.d/qsysd.conf \
         ./usr/share/man/man8/qsysd.8.gz ./usr/share/man/man1/qsys-push.1.gz \
         ./usr/share/man/man5/qsysd.toml.5.gz ./usr/share/doc/qsysd/copyright \
         ./usr/lib/systemd/system/qsys-push@.service ./usr/lib/systemd/system/qsys-push@.timer; do
  awk '{print $6}' <<<"$listing" | grep -qx -- "$f" || fail "missing $f"
done
grep -E ' \./etc/qsysd\.toml$' <<<"$listing" | grep -q '^-rw-r-----' || fail "etc/qsysd.toml is not 0640"
ok "file list and modes"
# The product carries no test-only code: neither the pause points (feature test-utils) nor the
# fake GPU fleet (crates/fakefleet) may be in the packaged binaries.
bin_dir=$(mktemp -d)
dpkg-deb -x "$deb" "$bin_dir"
for marker in hand-back:released dispatch:before-send fake-gpu- fake-callback-; do
  if grep -aq -- "$marker" "$bin_dir/usr/bin/qsysd" "$bin_dir/usr/bin/qsys-push"; then
    fail "test-only code in the package: $marker"
  fi
done
rm -rf "$bin_dir"
ok "no test-only code in the binaries"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
[ "$conffiles" = "/etc/qsysd.toml" ] || fail "conffiles are: $conffiles"
ok "conffiles: $conffiles"
postinst=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst)
grep -q 'restart' <<<"$postinst" || fail "postinst does not restart the service on upgrade"

# A database that must survive a purge.
mariadb -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS qsys_deb_sentinel'

# Install.
dpkg_ --purge qsysd || true
dpkg_ -i "$deb"
getent passwd qsysd >/dev/null || fail "no qsysd user"
[ "$(stat -c '%U:%G %a' /etc/qsysd.toml)" = "root:qsysd 640" ] || fail "/etc/qsysd.toml: $(stat -c '%U:%G %a' /etc/qsysd.toml)"
[ "$(stat -c '%U:%G %a' /etc/qsysd/callback.secret)" = "root:qsysd 640" ] || fail "callback.secret mode"
[ "$(wc -c < /etc/qsysd/callback.secret)" -ge 32 ] || fail "callback.secret too short"
ok "installed: user qsysd, /etc/qsysd.toml root:qsysd 0640, callback secret generated"
out=$(/usr/bin/qsysd --check-config) || fail "installed qsysd --check-config: $out"
grep -q 'config ok: /etc/qsysd.toml' <<<"$out" || fail "check-config said: $out"
ok "installed qsysd --check-config"
installed_unit=/${unit#./}
verify=$(systemd-analyze verify "$installed_unit" 2>&1 || true)
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"
score=$(systemd-analyze security --offline=yes "$installed_unit" 2>/dev/null | sed -n 's/.*Overall exposure level for qsysd.service: \([0-9.]*\).*/\1/p')
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "security exposure $score > 2.0"
ok "unit: systemd-analyze verify clean, exposure $score"

# Periodic tasks: the installed template pair, as an instance, verifies clean; the service's own
# command line (with a test config and task file in place of /etc/qsysd/...) pushes the task.
timers=$(mktemp -d)
for kind in service timer; do
  cp "/usr/lib/systemd/system/qsys-push@.$kind" "$timers/qsys-push@deb-check.$kind"
done
verify=$(cd "$timers" && systemd-analyze verify qsys-push@deb-check.timer qsys-push@deb-check.service 2>&1 || true)
[ -z "$verify" ] || fail "systemd-analyze verify of qsys-push@.timer: $verify"
exec_start=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/qsys-push@.service)
queue="qsys-deb-check:$$:timer"
printf '[redis]\nurl = "redis://127.0.0.1:6379/0"\nqueues = ["%s"]\n' "$queue" > "$timers/push.toml"
echo '{"type": "cleanup", "data": {"older_than_days": 30}}' > "$timers/deb-check.json"
cmd=${exec_start//%i/deb-check}
cmd=${cmd//\/etc\/qsysd.toml/$timers/push.toml}
cmd=${cmd//\/etc\/qsysd\/push\//$timers/}
$cmd >/dev/null || fail "the timer's command failed: $cmd"
[ "$(redis-cli -h 127.0.0.1 LLEN "$queue")" = "1" ] || fail "the timer's command pushed nothing"
redis-cli -h 127.0.0.1 DEL "$queue" >/dev/null
rm -rf "$timers"
ok "periodic tasks: qsys-push@.timer verifies clean and its command pushes the task"

# Upgrade keeps an edited config.
echo "# edited by the operator" >> /etc/qsysd.toml
version=$(dpkg-deb -f "$deb" Version)
cargo deb --no-build --locked --deb-version "${version%-*}-99" --output "$work/upgrade.deb" >/dev/null
dpkg_ -i "$work/upgrade.deb"
grep -q '^# edited by the operator' /etc/qsysd.toml || fail "upgrade lost the edited config"
[ "$(dpkg-query -W -f='${Version}' qsysd)" = "${version%-*}-99" ] || fail "upgrade did not install"
ok "upgrade keeps the edited config"

# Remove keeps the config; purge removes it and never touches the database.
dpkg_ -r qsysd
[ ! -e /usr/bin/qsysd ] || fail "remove left /usr/bin/qsysd"
[ -e /etc/qsysd.toml ] || fail "remove deleted the config"
dpkg_ -P qsysd
[ ! -e /etc/qsysd.toml ] && [ ! -e /etc/qsysd ] || fail "purge left /etc/qsysd.toml or /etc/qsysd"
mariadb -h 127.0.0.1 -u root -e 'USE qsys_deb_sentinel' || fail "purge touched the database"
mariadb -h 127.0.0.1 -u root -e 'DROP DATABASE qsys_deb_sentinel'
ok "remove keeps the config, purge removes it, the database is untouched"

# lintian: no errors.
lintian --fail-on error --tag-display-limit 0 "$deb" || fail "lintian reports errors"
ok "lintian: no errors"
echo "test-deb: $passed passed, 0 failed"
