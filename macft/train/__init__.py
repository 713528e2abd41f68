"""Training: the loop around a compiled step, the chunked loss, schedules, checkpoints, whole runs.

    from macft.train.run import run_training, run_demo    # what `macft lora` calls
    from macft.train.loop import train, Callback          # the loop alone, for custom pipelines
"""
