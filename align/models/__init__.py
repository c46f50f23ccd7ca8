"""Base models, tokenizers, adapters, published artifacts, and the reference policy.

The modules are imported by name (``align.models.load``, ``align.models.adapters``, ...): the package
itself imports none of them, so a process that only needs a tokenizer (the stage entrypoint's data
check) does not pay for peft and bitsandbytes.
"""
