#!/bin/sh
# Demo handler for the non-GPU task types: reads the task JSON on stdin, "works" briefly, and
# succeeds. A cleanup for user 0 fails, to show how a failed handler looks.
input=$(cat)
sleep 0.3
case "$QSYS_TASK_TYPE:$input" in
  cleanup:*'"user_id":0'*) echo "cleanup: user 0 does not exist" >&2; exit 1 ;;
esac
echo "$(date +%T) $QSYS_TASK_TYPE $QSYS_TASK_ID done" >> "${DEMO_DIR:-/tmp}/handlers.log"
