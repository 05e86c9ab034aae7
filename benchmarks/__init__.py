"""Benchmarks of jaxlora against full fine-tuning, Hugging Face PEFT and lorax (run `python -m benchmarks.run`)."""
