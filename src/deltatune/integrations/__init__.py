"""Bridges to other libraries (Hugging Face peft, transformers, accelerate), imported lazily."""
