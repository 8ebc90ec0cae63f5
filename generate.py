"""python generate.py ckpt=PATH|last prompt="..." [key=value ...]: see configs/generate.yaml."""

if __name__ == "__main__":
    try:  # Ctrl-C at any moment, even while the imports load: exit status 130, no traceback (charlstm.app.command)
        from charlstm.app.command import run_command

        run_command(__file__, "generate", "charlstm.app.generate:run")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
