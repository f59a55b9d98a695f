#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (projector pretraining) with an EVA-CLIP vision tower, in the shape of LLaVA's
# scripts/v1_5/pretrain.sh. VISION_TOWER is a directory written by `llava-evaclip convert`.
#
# Every path, the launcher and the DeepSpeed config can be overridden from the environment, and any extra arguments
# are appended to LLaVA's (the last occurrence of a flag wins), e.g.
#   VISION_TOWER=./checkpoints/EVA02-CLIP-L-14-336 bash integration/pretrain.sh --max_steps 10
#   LAUNCHER="torchrun --nproc_per_node 8" bash integration/pretrain.sh
#   LAUNCHER=python DEEPSPEED_CONFIG= ENTRY=llava.train.train bash integration/pretrain.sh --bf16 False --tf32 False \
#       --report_to none
# (--report_to none unless wandb is installed: the Trainer refuses to start with --report_to wandb without it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-llava.train.train_mem}
MODEL_PATH=${MODEL_PATH:-lmsys/vicuna-13b-v1.5}
VISION_TOWER=${VISION_TOWER:-./checkpoints/EVA02-CLIP-L-14-336}
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b-evaclip-pretrain}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG-$HERE/zero2.json}  # empty: no DeepSpeed

DEEPSPEED_ARGS=()
if [ -n "$DEEPSPEED_CONFIG" ]; then
    DEEPSPEED_ARGS=(--deepspeed "$DEEPSPEED_CONFIG")
fi

# shellcheck disable=SC2086  # LAUNCHER may carry its own arguments
$LAUNCHER "$HERE/run_llava.py" "$ENTRY" \
    ${DEEPSPEED_ARGS[@]+"${DEEPSPEED_ARGS[@]}"} \
    --model_name_or_path "$MODEL_PATH" \
    --version plain \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    "$@"
