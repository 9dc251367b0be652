# Sourced by the scripts of docs/results: `timed NAME command...` runs the command with its
# output in $O/NAME.log and appends its exit code and wall seconds to $O/times.
timed() {
    local name=$1; shift; local s; s=$(date +%s)
    "$@" > "$O/$name.log" 2>&1
    echo "$name rc=$? seconds=$(( $(date +%s) - s ))" >> "$O/times"
}
