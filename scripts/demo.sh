#!/usr/bin/env bash
# The main demo, end to end on Spark local mode (local[*] unless SPARKVISION_MASTER says otherwise):
# Fashion-MNIST -> image table -> train a small CNN -> evaluate -> batch-classify the table.
set -euo pipefail

cd "$(dirname "$0")/.."
SV=${SV:-.venv/bin/sparkvision}
DATA=${DATA:-data/fashion-mnist}
RUN=${RUN:-runs/demo-cnn}
PRED=${PRED:-runs/demo-predictions}

step() { printf '\n\033[1m==> sparkvision %s\033[0m\n' "$*"; }

# A re-run keeps the table and replaces the demo's own outputs (--overwrite: without it sparkvision
# refuses to write over data that is already there).
if [ -f "$DATA/_sparkvision.json" ]; then
    printf '\n\033[1m==> %s is already an image table: kept\033[0m\n' "$DATA"
else
    step datasets fashion-mnist "$DATA"
    "$SV" datasets fashion-mnist "$DATA"
fi

step train --model cnn --table "$DATA" --out "$RUN" --epochs 2 --overwrite
"$SV" train --model cnn --table "$DATA" --out "$RUN" --epochs 2 --overwrite

step evaluate "$RUN" "$DATA"
"$SV" evaluate "$RUN" "$DATA"

step predict "$RUN" "$DATA" "$PRED" --overwrite
"$SV" predict "$RUN" "$DATA" "$PRED" --overwrite

printf '\n\033[1mdemo finished:\033[0m table %s, model %s, predictions %s\n' "$DATA" "$RUN" "$PRED"
