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

step datasets fashion-mnist "$DATA"
"$SV" datasets fashion-mnist "$DATA"

step train --model cnn --table "$DATA" --out "$RUN" --epochs 2
"$SV" train --model cnn --table "$DATA" --out "$RUN" --epochs 2

step evaluate "$RUN" "$DATA"
"$SV" evaluate "$RUN" "$DATA"

step predict "$RUN" "$DATA" "$PRED"
"$SV" predict "$RUN" "$DATA" "$PRED"

printf '\n\033[1mdemo finished:\033[0m table %s, model %s, predictions %s\n' "$DATA" "$RUN" "$PRED"
