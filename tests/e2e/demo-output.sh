# Sourced by the demos (demo.sh, tests/e2e/standalone-demo.sh): how they print what they do.
# Bold and dim only on a terminal, so a saved or piped run holds no escape codes.
# shellcheck shell=bash
bold=$'\033[1m' dim=$'\033[2m' off=$'\033[0m'
[[ -t 1 ]] || { bold='' dim='' off=''; }
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
note() { printf '%s   %s%s\n' "$dim" "$*" "$off"; }
run() { # prints the command, shell-quoted where needed (to be pasted), then runs it
  local a
  printf '$'
  for a in "$@"; do
    if [[ $a =~ [^A-Za-z0-9_./:=@%+,-] ]]; then printf " '%s'" "$a"; else printf ' %s' "$a"; fi
  done
  echo
  "$@"
  echo
}
die() { printf 'demo failed: %s\n' "$*" >&2; exit 1; }
