"""Training metrics: one log line per ``logging.log_interval`` on rank 0, TensorBoard, W&B.

Line: iteration, loss, lr, grad norm, loss scale (fp16 only), tokens/s and samples/s of the
global batch, model TFLOP/s per GPU, MFU and HFU (``training/flops.py``: model FLOPs, and hardware
FLOPs with recomputation; both against the GPU's dense bf16 peak, n/a on CPU), step time and
peak GPU memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lov15_megatron.config import RunConfig, config_to_dict
from lov15_megatron.runtime.distributed import Runtime
from lov15_megatron.training.flops import StepCounts
from lov15_megatron.training.step import StepResult


class MetricsLogger:
    def __init__(self, cfg: RunConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.tb = self.wandb = None
        if self.rank0 and cfg.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard_dir is set but TensorBoard is not installed "
                    "(pip install tensorboard)"
                ) from e
            self.tb = SummaryWriter(cfg.logging.tensorboard_dir)
        if self.rank0 and cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from e
            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=config_to_dict(cfg))

    def log(
        self,
        iteration: int,
        res: StepResult,
        seconds: float,
        counts: StepCounts,
        tflops_per_gpu: float,
        peak_tflops: float | None,
        hardware_tflops_per_gpu: float | None = None,
    ) -> None:
        last = iteration == self.cfg.train.train_iters
        if not self.rank0 or (iteration % self.cfg.logging.log_interval and not last):
            return
        values = {
            "loss": res.loss,
            "lr": res.lr,
            "grad_norm": res.grad_norm if res.grad_norm is not None else float("nan"),
            "tokens_per_s": counts.token_positions / seconds,
            "samples_per_s": counts.samples / seconds,
            "tflops_per_gpu": tflops_per_gpu,
            "step_time_s": seconds,
        }
        hw = tflops_per_gpu if hardware_tflops_per_gpu is None else hardware_tflops_per_gpu
        values["hardware_tflops_per_gpu"] = hw
        mfu = f"{100 * tflops_per_gpu / peak_tflops:.1f}%" if peak_tflops else "n/a"
        hfu = f"{100 * hw / peak_tflops:.1f}%" if peak_tflops else "n/a"
        mem = ""
        if self.rt.device.type == "cuda":
            values["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            mem = f" mem={values['max_memory_gib']:.1f}GiB"
        scale = f" loss_scale={res.loss_scale:g}" if res.loss_scale is not None else ""
        print(
            f"iter {iteration}/{self.cfg.train.train_iters} loss={res.loss:.5f} lr={res.lr:.3e} "
            f"grad_norm={values['grad_norm']:.4f}{scale} tokens/s={values['tokens_per_s']:,.0f} "
            f"samples/s={values['samples_per_s']:.2f} TFLOP/s/GPU={tflops_per_gpu:.3f} "
            f"MFU={mfu} HFU={hfu} step={seconds:.3f}s{mem}"
            + (" (update skipped)" if res.skipped else ""),
            flush=True,
        )
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, iteration)
        if self.wandb is not None:
            self.wandb.log(values, step=iteration)

    def log_validation(self, v) -> None:
        """One line per evaluation (a ``training.validation.ValidationResult``)."""
        if not self.rank0:
            return
        print(
            f"validation iter {v.iteration}/{self.cfg.train.train_iters} loss={v.loss:.5f} "
            f"tokens={v.tokens:,} batches={v.batches}",
            flush=True,
        )
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", v.loss, v.iteration)
        if self.wandb is not None:
            self.wandb.log({"valid_loss": v.loss}, step=v.iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
