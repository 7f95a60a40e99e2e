"""The training engine on megatron-core: `python -m ascendfactory.engine --config <output_dir>/exp-config.yaml`,
one process per device under torchrun.

Exit codes of each worker:
  0  training finished (final checkpoint saved)
  1  failure (traceback on the rank's stderr), or training diverged (`error:` line: loss / grad norm not finite)
  2  bad input (UserError: one line naming the file / key and the fix)
  3  stopped by SIGTERM / SIGINT after saving a checkpoint; relaunch with train_auto_resume to continue
Codes 1 and 2 come with the one-line reason (or the traceback) in the rank's torchelastic error file
(TORCHELASTIC_ERROR_FILE). torchrun exits 1 when any worker exits non-zero; under ascendfactory.launch.agent
(train.sh) a worker's exit 2 is not restarted. A worker gets SIGTERM when its torchrun dies.
The codes are defined in ascendfactory.errors, which the launcher reads them from too.
"""
