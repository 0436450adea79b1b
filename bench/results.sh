#!/usr/bin/env bash
# Regenerates docs/results.md: every table there is printed by the `fedtt compare` / `fedtt tune` command
# written above it. Every method runs with its own defaults (src/fedtt/defaults.py, chosen by the `tune`
# sections on validation; --no-tune: these tables predate compare's default search), the same data, splits,
# budget and seeds; tables give the test metric at the validation-selected round and at the final round, mean
# +- std over the seeds.
# Usage: bash bench/results.sh [SECTION ... | --doc-only]   (default: every section; hours on 2 cores)
# Run sections one at a time: two torch jobs on 2 cores are several times slower than one after the other.
# A section that was killed continues where it stopped (finished runs are reused); FRESH=1 starts it over.
# Runs go to docs/results/<section>/; git keeps each run's config.toml and results.json there (its .gitignore),
# which is all a finished run needs to be reused, so a section continues on another machine from a clone.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-docs/results}
FEDERATED=fedtt,fedtt+:adaptive,fedtt+:cyclic,fedtt+:fixed,lora,ffa-lora
ALL=$FEDERATED,centralized,centralized:lora  # centralized: one client, so the same run for every partition
MAIN=fedtt,fedtt+,lora,ffa-lora
declare -A TITLE ARGS
TITLE[tune-fedtt]="Choosing the defaults: FedTT (learning rate x adapter biases), Rotten Tomatoes, Dirichlet 0.5, validation only"
ARGS[tune-fedtt]="tune --config configs/demo.toml --quick --seeds 0,1 --methods fedtt --grid federation.lr=1e-3,3e-3,1e-2 --grid adapter.train_biases=true,false"
TITLE[tune-lora]="Choosing the defaults: LoRA and FFA-LoRA (learning rate), Rotten Tomatoes, Dirichlet 0.5, validation only"
ARGS[tune-lora]="tune --config configs/demo.toml --quick --seeds 0,1 --methods lora,ffa-lora --grid federation.lr=1e-3,3e-3,1e-2"
# The package defaults serve `fedtt run` with no config (10 rounds), whose saved adapter is the final round's.
TITLE[tune-default]="Choosing the package defaults: FedTT learning rate x schedule for \`fedtt run\` with no config (MiniLM, Rotten Tomatoes, 3 clients, Dirichlet 0.5, 10 rounds, whole splits), validation only, chosen at the final round"
ARGS[tune-default]="tune --seeds 0,1 --methods fedtt --grid federation.lr=3e-3,1e-2,2e-2 --grid federation.lr_schedule=constant,cosine --by final"
TITLE[tune-default-lora]="Choosing the package defaults: LoRA and FFA-LoRA schedule at their learning rates for \`fedtt run\` with no config (as above), validation only, chosen at the final round"
ARGS[tune-default-lora]="tune --seeds 0,1 --methods lora,ffa-lora --grid federation.lr_schedule=constant,cosine --by final"
TITLE[rt-dir0.5]="Rotten Tomatoes, 3 clients, Dirichlet alpha = 0.5"
ARGS[rt-dir0.5]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $MAIN"
TITLE[rt-dir0.1]="Rotten Tomatoes, 3 clients, Dirichlet alpha = 0.1"
ARGS[rt-dir0.1]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $FEDERATED --set federation.alpha=0.1"
TITLE[rt-iid]="Rotten Tomatoes, 3 clients, IID"
ARGS[rt-iid]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $FEDERATED --set federation.partition=iid"
TITLE[rt-skew]="Rotten Tomatoes, 3 clients, label skew [[.15,.85],[.85,.15],[.5,.5]]"
ARGS[rt-skew]="compare --no-tune --config configs/cross_silo.toml --quick --seeds 0,1,2 --methods $FEDERATED"
TITLE[trec-dir0.5]="TREC (6 classes), 3 clients, Dirichlet alpha = 0.5"
ARGS[trec-dir0.5]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $ALL --set task.name=trec"
TITLE[rt-xdev]="Cross-device: Rotten Tomatoes, 100 clients, 10 per round, Dirichlet alpha = 1.0, 10 rounds"
ARGS[rt-xdev]="compare --no-tune --config configs/cross_device.toml --quick --seeds 0,1,2 --methods fedtt,lora,ffa-lora --set federation.num_clients=100 --set federation.rounds=10"
TITLE[rt-dir0.5-long]="Rotten Tomatoes, 3 clients, Dirichlet alpha = 0.5, 15 rounds"
ARGS[rt-dir0.5-long]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $MAIN --set federation.rounds=15"
TITLE[rt-dir0.1-long]="Rotten Tomatoes, 3 clients, Dirichlet alpha = 0.1, 15 rounds"
ARGS[rt-dir0.1-long]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods fedtt+,lora --set federation.rounds=15 --set federation.alpha=0.1"
TITLE[trec-dir0.5-long]="TREC (6 classes), 3 clients, Dirichlet alpha = 0.5, 15 rounds"
ARGS[trec-dir0.5-long]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $MAIN --set federation.rounds=15 --set task.name=trec"
TITLE[init]="Ablation: LoRETTA's random init instead of the identity init (Rotten Tomatoes, Dirichlet 0.5)"
ARGS[init]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods fedtt --set adapter.init=loretta"
TITLE[norms]="Controlled extras: every method also trains the LayerNorms (Rotten Tomatoes, Dirichlet 0.5)"
ARGS[norms]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $MAIN --set adapter.train_norms=true"
TITLE[optimizer]="Ablation: warm-up 1 round, linear decay, gradient clipping 1.0 (Rotten Tomatoes, Dirichlet 0.5)"
ARGS[optimizer]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods fedtt,lora --set federation.warmup_rounds=1 --set federation.lr_schedule=linear --set federation.clip_grad_norm=1.0"
TITLE[head]="Ablation: the tensorized head (a TT layer beside the pooler; Rotten Tomatoes, Dirichlet 0.5)"
ARGS[head]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods fedtt,fedtt+ --set adapter.head=tensorized"
# DP runs have the non-private runs' budget (batch 16 x 20 steps, 5 rounds) and each method's own defaults: the
# only difference is per-example clipping and noise. tune-dp asks whether another learning rate suits DP better
# (validation at epsilon 3, the same grid for every method); the dp-eps sections do not read its choice.
DP="--set privacy.dp=true"
TITLE[tune-dp]="Choosing the DP learning rate of every method at epsilon = 3, Rotten Tomatoes, Dirichlet 0.5, validation only"
ARGS[tune-dp]="tune --config configs/demo.toml --quick --seeds 0,1 --methods $MAIN $DP --set privacy.target_epsilon=3 --grid federation.lr=1e-3,3e-3,1e-2"
for eps in 8 3 1; do
  TITLE[dp-eps$eps]="Local DP-SGD, epsilon = $eps per client for the whole run (delta 1e-5, clipping 1.0; Rotten Tomatoes, Dirichlet 0.5)"
  ARGS[dp-eps$eps]="compare --no-tune --config configs/demo.toml --quick --seeds 0,1,2 --methods $MAIN $DP --set privacy.target_epsilon=$eps"
done
for dtype in float16 bfloat16; do
  TITLE[wire-$dtype]="Half precision on the wire: federation.wire_dtype = $dtype, both directions (Rotten Tomatoes, Dirichlet 0.5)"
  ARGS[wire-$dtype]="compare --no-tune --config configs/demo.toml --quick --seeds 0 --methods fedtt --set federation.wire_dtype=$dtype"
done
TITLE[smollm2-trec]="Decoder: SmolLM2-135M instruction tuning on templated TREC, 3 clients, Dirichlet 0.5"
SMOLLM2="compare --no-tune --config configs/smollm2_instruct.toml --seeds 0,1,2 --methods $MAIN --set task.max_eval_examples=100 --set task.eval_batch_size=32"  # 7-9 min a run: 1.7 h a task
ARGS[smollm2-trec]="$SMOLLM2"
TITLE[smollm2-sms]="Decoder: SmolLM2-135M instruction tuning on templated SMS spam, 3 clients, Dirichlet 0.5"
ARGS[smollm2-sms]="$SMOLLM2 --set task.name=sms_spam"
# The accuracy-communication frontier (issue 32): each point's learning rate is searched on seed 0 at the quick
# budget (5 rounds), then every seed runs 15 rounds at that rate; the points without a search of their own (LoRA r8,
# FedTT rank 5, FedTT+ one group a round) run at their package defaults, which the tune-fedtt / tune-lora sections
# chose on this task at the quick budget (seeds 0, 1).
FRONTIER_SIZES="--sizes lora=1,2,8 --sizes fedtt=2,5 --sizes fedtt+=1 --sizes fed-sb=32 --wire-dtypes float32"
TITLE[frontier-rt-dir0.5-tuning]="Frontier, the rate search: Rotten Tomatoes, Dirichlet 0.5, quick budget, seed 0, validation only"
ARGS[frontier-rt-dir0.5-tuning]="frontier --config configs/demo.toml --quick --seeds 0 --methods lora,fedtt,fed-sb --sizes lora=1,2 --sizes fedtt=2 --sizes fed-sb=32 --wire-dtypes float32"
TITLE[frontier-rt-dir0.5-long]="Frontier: accuracy against bytes, Rotten Tomatoes, 3 clients, Dirichlet 0.5, 15 rounds"
ARGS[frontier-rt-dir0.5-long]="frontier --config configs/demo.toml --quick --set federation.rounds=15 --seeds 0,1,2 --methods lora,fedtt,fedtt+,fed-sb $FRONTIER_SIZES --tuned docs/results/frontier-rt-dir0.5-tuning"
ORDER=(tune-default tune-default-lora tune-fedtt tune-lora rt-dir0.5 rt-dir0.1 rt-iid rt-skew trec-dir0.5 rt-xdev rt-dir0.5-long rt-dir0.1-long
       trec-dir0.5-long init norms optimizer head wire-float16 wire-bfloat16 tune-dp dp-eps8 dp-eps3 dp-eps1 smollm2-trec
       smollm2-sms frontier-rt-dir0.5-tuning frontier-rt-dir0.5-long)
if [[ "${1:-}" == --doc-only ]]; then sections=(); else sections=("${@:-${ORDER[@]}}"); fi
mkdir -p "$OUT"
for s in "${sections[@]}"; do
  [[ -n "${ARGS[$s]:-}" ]] || { echo "unknown section $s; sections: ${ORDER[*]}"; exit 2; }
  # shellcheck disable=SC2086
  .venv/bin/fedtt ${ARGS[$s]} "$([[ -n "${FRESH:-}" ]] && echo --overwrite || echo --resume)" --out "$OUT/$s" > "$OUT/$s.log" 2>&1 || { tail -n 30 "$OUT/$s.log"; exit 1; }
done

# The hand-written reading above the marker is kept; everything below it is regenerated.
MARKER='<!-- Everything below is generated by bench/results.sh from docs/results/: edit only above this line. -->'
doc=docs/results.md.tmp
awk -v m="$MARKER" '{print} $0 == m {found = 1; exit} END {exit !found}' docs/results.md > "$doc" \
  || { echo "docs/results.md lacks the marker line; put it back: $MARKER"; exit 1; }
for s in "${ORDER[@]}"; do
  table="$OUT/$s/comparison.md"; [[ -f "$OUT/$s/tune.md" ]] && table="$OUT/$s/tune.md"
  [[ -f "$OUT/$s/frontier.md" ]] && table="$OUT/$s/frontier.md"
  if [[ -f "$table" ]]; then
    printf '\n## %s\n\n```\nfedtt %s --out %s\n```\n\n' "${TITLE[$s]}" "${ARGS[$s]}" "$OUT/$s" >> "$doc"
    [[ -f "$OUT/$s/frontier.png" ]] && printf '![%s](%s)\n\n' "$s" "${OUT#docs/}/$s/frontier.png" >> "$doc"
    tail -n +3 "$table" >> "$doc"  # from its table: the section heading above replaces its title
  else  # not run since runs were kept in git: the section as docs/results.md has it, if it has it
    awk -v h="## ${TITLE[$s]}" '$0 == h {on = 1; print ""; print; next} on && /^## / {exit}
      on && $0 == "" {blank++; next} on {while (blank > 0) {print ""; blank--} print}' docs/results.md >> "$doc"
  fi
done
printf '\n## Communication at paper scale (meta device, no weights)\n\n```\npython bench/comm_table.py\n```\n\n' >> "$doc"
.venv/bin/python bench/comm_table.py >> "$doc"
mv "$doc" docs/results.md
