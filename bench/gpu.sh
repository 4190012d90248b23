#!/bin/sh
# Issue 6's GPU figures in one run: bf16 tokens/s, MFU and torch.cuda.max_memory_allocated for LoRA and
# QLoRA-4bit on the Qwen2-0.5B shape at sequence lengths 1024 and 4096, then `lorakit plan` against the
# measured peaks; given 2 GPUs, issue 25's strategies (bench/strategies.py). About 10 minutes on one H200
# once the packages are there (datasets, trl and bitsandbytes may have to travel as wheels). Markdown tables
# go to stdout and, if $OUT is set, to $OUT/gpu.md, for bench/RESULTS.md.
#
#     sh bench/gpu.sh                      # on the GPU machine
#     SHAPE=small STEPS=3 sh bench/gpu.sh  # a quick dry run of the script itself, on any machine
set -eu
shape=${SHAPE:-0.5b}
log=${OUT:-/tmp}/gpu.md
: >"$log"
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$log"
for seq in 1024 4096; do
    python3 bench/methods.py --shape "$shape" --seq "$seq" --steps "${STEPS:-20}" --methods "${METHODS:-lora,qlora-4bit}" \
        | tee -a "$log"
done
python3 bench/plan_check.py "$shape" | tee -a "$log"
# Issue 25: one process against two under ddp, fsdp, zero2 and zero3 (tokens/s, peak memory per GPU); needs 2 GPUs.
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    python3 bench/strategies.py --shape "$shape" --seq 1024 --steps "${STEPS:-20}" --strategies ddp,fsdp,zero2,zero3 \
        | tee -a "$log"
else
    echo "bench/strategies.py: fewer than 2 GPUs here, not run" | tee -a "$log"
fi
