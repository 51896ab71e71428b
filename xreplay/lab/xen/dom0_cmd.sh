#!/bin/sh
# Command server handler in the lab's dom0 (run by `nc -ll -p 7000 -e` per connection).
# Request: one line "SECONDS BASE64-OF-SHELL-SCRIPT". Reply: the script's stdout+stderr,
# then "\n__XREPLAY_RC__ <exit code>\n". The script gets killed after SECONDS.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
read -r secs b64 || exit 0
f=/tmp/xreplay-cmd.$$
echo "$b64" | base64 -d > "$f"
timeout -s KILL "$secs" sh "$f" </dev/null 2>&1
rc=$?
rm -f "$f"
printf '\n__XREPLAY_RC__ %d\n' "$rc"
