#!/usr/bin/env bash
# LLaVA-OneVision's full-model stages with an EVA-CLIP vision tower, in the shape of LLaVA-NeXT's
# scripts/train/finetune_ov.sh: Stage 1.5 (high-quality knowledge), Stage 2 single-image and Stage 2 OneVision differ
# only in DATA_PATH, OUTPUT_DIR (one per stage: an OUTPUT_DIR that is MODEL_PATH is refused) and MODEL_PATH (the
# previous stage's output; for Stage 1.5 the language model, with PRETRAIN_MM_MLP_ADAPTER the projector Stage 1
# wrote, and empty PRETRAIN_MM_MLP_ADAPTER= after it). The tower, projector and language model are trained
# (`--mm_tunable_parts`), the tower at its own learning rate (`--mm_vision_tower_lr`); images are tiled with
# anyres_max_9 over grids of 1x1 to 6x6 tower tiles. Needs LLaVA-NeXT's `llava` package on PYTHONPATH and
# transformers 4.x. Environment overrides and extra arguments as in onevision_stage1.sh (`--report_to none` unless
# wandb is installed).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-llava.train.train_mem}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2-7B-Instruct}
PRETRAIN_MM_MLP_ADAPTER=${PRETRAIN_MM_MLP_ADAPTER-./checkpoints/projectors/llavanext-evaclip-qwen2-7b-mlp2x_gelu-pretrain_blip558k_plain/mm_projector.bin}
VISION_TOWER=${VISION_TOWER:-./checkpoints/EVA02-CLIP-L-14-336}
DATA_PATH=${DATA_PATH:-./scripts/train/onevision.yaml}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/onevision/images}
VIDEO_FOLDER=${VIDEO_FOLDER:-./playground/data/onevision/videos}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-onevision-evaclip-qwen2-7b}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG-$HERE/zero3.json}  # empty: no DeepSpeed
ATTN_IMPLEMENTATION=${ATTN_IMPLEMENTATION:-sdpa}
# Empty when the tower is left out of --mm_tunable_parts: LLaVA-NeXT then builds empty tower parameter groups, which
# ZeRO-3 drops, and its scheduler fails ("zip() argument 2 is longer than argument 1"), with any tower.
MM_VISION_TOWER_LR=${MM_VISION_TOWER_LR-2e-6}

DEEPSPEED_ARGS=()
if [ -n "$DEEPSPEED_CONFIG" ]; then
    DEEPSPEED_ARGS=(--deepspeed "$DEEPSPEED_CONFIG")
fi
TOWER_LR_ARGS=()
if [ -n "$MM_VISION_TOWER_LR" ]; then
    TOWER_LR_ARGS=(--mm_vision_tower_lr "$MM_VISION_TOWER_LR")
fi
ADAPTER_ARGS=()  # empty PRETRAIN_MM_MLP_ADAPTER: MODEL_PATH is a LLaVA checkpoint that has its projector
if [ -n "$PRETRAIN_MM_MLP_ADAPTER" ]; then
    ADAPTER_ARGS=(--pretrain_mm_mlp_adapter "$PRETRAIN_MM_MLP_ADAPTER")
fi

# shellcheck disable=SC2086  # LAUNCHER may carry its own arguments
$LAUNCHER "$HERE/run_llava.py" "$ENTRY" \
    ${DEEPSPEED_ARGS[@]+"${DEEPSPEED_ARGS[@]}"} \
    --model_name_or_path "$MODEL_PATH" \
    ${ADAPTER_ARGS[@]+"${ADAPTER_ARGS[@]}"} \
    --version qwen_1_5 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --video_folder "$VIDEO_FOLDER" \
    --mm_tunable_parts "mm_vision_tower,mm_mlp_adapter,mm_language_model" \
    ${TOWER_LR_ARGS[@]+"${TOWER_LR_ARGS[@]}"} \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --group_by_modality_length True \
    --image_aspect_ratio anyres_max_9 \
    --image_grid_pinpoints "(1x1),...,(6x6)" \
    --mm_patch_merge_type spatial_unpad \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 1000 \
    --save_total_limit 1 \
    --learning_rate 1e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 32768 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    --dataloader_drop_last True \
    --frames_upbound 32 \
    --attn_implementation "$ATTN_IMPLEMENTATION" \
    "$@"
