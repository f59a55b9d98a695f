#!/usr/bin/env bash
# LLaVA-1.5 stage 2 (visual instruction tuning) with an EVA-CLIP vision tower, in the shape of LLaVA's
# scripts/v1_5/finetune.sh. VISION_TOWER is a directory written by `llava-evaclip convert`; PRETRAIN_MM_MLP_ADAPTER
# is the mm_projector.bin that pretrain.sh wrote.
#
# Every path, the launcher and the DeepSpeed config can be overridden from the environment, and any extra arguments
# are appended to LLaVA's (the last occurrence of a flag wins), e.g. `--unfreeze_mm_vision_tower True` to train the
# tower too, or `--mm_vision_select_layer=-2,-5,-8` for several layers; `--report_to none` unless wandb is installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-llava.train.train_mem}
MODEL_PATH=${MODEL_PATH:-lmsys/vicuna-13b-v1.5}
VISION_TOWER=${VISION_TOWER:-./checkpoints/EVA02-CLIP-L-14-336}
PRETRAIN_MM_MLP_ADAPTER=${PRETRAIN_MM_MLP_ADAPTER:-./checkpoints/llava-v1.5-13b-evaclip-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b-evaclip}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG-$HERE/zero3.json}  # empty: no DeepSpeed

DEEPSPEED_ARGS=()
if [ -n "$DEEPSPEED_CONFIG" ]; then
    DEEPSPEED_ARGS=(--deepspeed "$DEEPSPEED_CONFIG")
fi

# shellcheck disable=SC2086  # LAUNCHER may carry its own arguments
$LAUNCHER "$HERE/run_llava.py" "$ENTRY" \
    ${DEEPSPEED_ARGS[@]+"${DEEPSPEED_ARGS[@]}"} \
    --model_name_or_path "$MODEL_PATH" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --pretrain_mm_mlp_adapter "$PRETRAIN_MM_MLP_ADAPTER" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
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
