#!/usr/bin/env bash
# Regenerates docs/results.md: every table there is printed by the `fedtt compare` command written above it.
# Usage: bash bench/results.sh [SECTION ...]   (default: all sections; each takes about 20 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/results}
ALL=fedtt,fedtt+:cyclic,fedtt+:fixed,fedtt+:adaptive,lora,ffa-lora,centralized
declare -A TITLE ARGS
TITLE[rt-dir0.5]="Rotten Tomatoes, 3 clients, Dirichlet alpha = 0.5"
ARGS[rt-dir0.5]="--config configs/demo.toml --methods $ALL"
TITLE[rt-dir0.1]="Rotten Tomatoes, 3 clients, Dirichlet alpha = 0.1"
ARGS[rt-dir0.1]="--config configs/demo.toml --methods $ALL --set federation.alpha=0.1"
TITLE[rt-iid]="Rotten Tomatoes, 3 clients, IID"
ARGS[rt-iid]="--config configs/demo.toml --methods $ALL --set federation.partition=iid"
TITLE[rt-skew]="Rotten Tomatoes, 3 clients, label skew [[.15,.85],[.85,.15],[.5,.5]]"
ARGS[rt-skew]="--config configs/cross_silo.toml --methods $ALL"
TITLE[trec-dir0.5]="TREC (6 classes), 3 clients, Dirichlet alpha = 0.5"
ARGS[trec-dir0.5]="--config configs/demo.toml --methods $ALL --set task.name=trec"
TITLE[rt-xdev]="Cross-device: Rotten Tomatoes, 100 clients, 10 per round, Dirichlet alpha = 1.0"
ARGS[rt-xdev]="--config configs/cross_device.toml --methods fedtt,lora,ffa-lora --set federation.num_clients=100 --set federation.rounds=10"
ORDER=(rt-dir0.5 rt-dir0.1 rt-iid rt-skew trec-dir0.5 rt-xdev)
sections=("${@:-${ORDER[@]}}")
mkdir -p "$OUT"

doc=docs/results.md.tmp
cat > "$doc" <<'MD'
# Results

Every table below was printed by the command above it; `bash bench/results.sh [section ...]` regenerates
this file. `--quick` runs the full bundled MiniLM (all-MiniLM-L6-v2, 6 layers) for 5 rounds with sequences
cut at 48 tokens and evaluates on 500 test examples; everything else comes from the named config
(3 clients, 20 local AdamW steps of batch 16 at lr 2e-3 per round, seed 0). Same data, same splits, same
seed and same local steps for every method. "centralized" is one client holding all the training data,
trained for 3 x 20 steps per round (the same work per round): the reference ceiling. FedTT+ policies
(src/fedtt/federated/freezing.py): cyclic trains one TT core per layer per round, rotating; fixed trains
core 0 only; adaptive starts with all cores and freezes those whose relative update fell below 1%.
MD
for s in "${sections[@]}"; do
  dir="$OUT/$s"
  # shellcheck disable=SC2086
  .venv/bin/fedtt compare --quick --overwrite --out "$dir" ${ARGS[$s]} > "$dir.log" 2>&1 || { cat "$dir.log"; exit 1; }
  printf '\n## %s\n\n```\nfedtt compare --quick --out %s %s\n```\n\n' "${TITLE[$s]}" "$dir" "${ARGS[$s]}" >> "$doc"
  cat "$dir/comparison.md" >> "$doc"
done
printf '\n## Communication at paper scale (meta device, no weights)\n\n```\npython bench/comm_table.py\n```\n\n' >> "$doc"
.venv/bin/python bench/comm_table.py >> "$doc"
mv "$doc" docs/results.md
