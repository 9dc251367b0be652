"""What a checkpoint takes with it to the Hugging Face Hub: its model card (`modelcard`) and the
upload (`hub`: the `push` stage)."""
