"""Encoders: BERT-family models exported for sentence embeddings (task "embed") or text
classification (task "classify"), with the pooling, normalization or classification head inside
the graph. ``export_model`` hands a source here when its task is one of those (see ``task``)."""
