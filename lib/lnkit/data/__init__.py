"""The tiny world's data: the fact base (:mod:`~lnkit.data.world`), the verifiable tasks
(:mod:`~lnkit.data.tasks`), splits and their storage (:mod:`~lnkit.data.splits`), the tokenizer
(:mod:`~lnkit.data.tokenizer`), the chat template with the thinking toggle (:mod:`~lnkit.data.chat`),
and the released post-training schema
(:mod:`~lnkit.data.released`)."""
