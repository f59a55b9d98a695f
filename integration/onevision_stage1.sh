#!/usr/bin/env bash
# LLaVA-OneVision Stage 1 (language-image alignment: the projector only) with an EVA-CLIP vision tower, in the shape of
# LLaVA-NeXT's scripts/train/pretrain_clip.sh. Needs LLaVA-NeXT's `llava` package on PYTHONPATH and transformers 4.x.
# VISION_TOWER is a directory written by `llava-evaclip convert`.
#
# Every path, the launcher and the DeepSpeed config can be overridden from the environment, and any extra arguments
# are appended to LLaVA-NeXT's (the last occurrence of a flag wins), e.g.
#   VISION_TOWER=./checkpoints/EVA02-CLIP-L-14-336 bash integration/onevision_stage1.sh --max_steps 10
#   LAUNCHER="torchrun --nproc_per_node 8" bash integration/onevision_stage1.sh
#   LAUNCHER=python DEEPSPEED_CONFIG= bash integration/onevision_stage1.sh --bf16 False --tf32 False --report_to none
# (--report_to none unless wandb is installed: the Trainer refuses to start with --report_to wandb without it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-llava.train.train_mem}  # LLaVA-NeXT's train_mem takes --attn_implementation (below)
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2-7B-Instruct}
VISION_TOWER=${VISION_TOWER:-./checkpoints/EVA02-CLIP-L-14-336}
DATA_PATH=${DATA_PATH:-./playground/data/blip_558k/blip_558k_plain.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/blip_558k/images}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/projectors/llavanext-evaclip-qwen2-7b-mlp2x_gelu-pretrain_blip558k_plain}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG-$HERE/zero3.json}  # empty: no DeepSpeed
ATTN_IMPLEMENTATION=${ATTN_IMPLEMENTATION:-sdpa}

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
    --mm_tunable_parts mm_mlp_adapter \
    --mm_vision_select_layer -2 \
    --mm_projector_type mlp2x_gelu \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "no" \
    --save_steps 50000 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 8192 \
    --gradient_checkpointing True \
    --dataloader_num_workers 16 \
    --lazy_preprocess True \
    --report_to wandb \
    --attn_implementation "$ATTN_IMPLEMENTATION" \
    "$@"
