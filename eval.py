"""python eval.py ckpt=PATH|last [data=file data.path=X] [key=value ...]: see configs/eval.yaml."""

if __name__ == "__main__":
    try:  # Ctrl-C at any moment, even while the imports load: exit status 130, no traceback (charlstm.app.command)
        from charlstm.app.command import run_command

        run_command(__file__, "eval", "charlstm.app.evaluate:run")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
