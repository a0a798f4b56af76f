#!/usr/bin/env bash
# Multi-node progressive pretraining under Slurm: one `accelerate launch` per node, which starts one
# process per GPU; the first node of the allocation is the rendezvous host.
#   sbatch launch/slurm_multinode.sh configs/CONFIG.yaml [--set key=value ...]
#SBATCH --job-name=progtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm_multinode.sh CONFIG [--set key=value ...]}
shift
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/multinode.yaml}
SCRIPT=${SCRIPT:-recipes/pretrain_gpt.py}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}

EXTRA=$(printf " %q" "$@")
# one task per node; each computes its own machine rank from SLURM_NODEID. The same launch flags
# (--num_machines/--machine_rank/--main_process_ip/--main_process_port, one launch per machine) are
# run over loopback with a growing run by tests/test_fsdp2.py::test_two_machines_over_loopback.
# For FSDP2 set ACCEL_CONFIG to an FSDP config with fsdp_version: 2 (launch/fsdp.yaml, num_machines 2).
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $ACCEL_CONFIG \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $HEAD --main_process_port $PORT \
    $SCRIPT --config $CONFIG$EXTRA"
