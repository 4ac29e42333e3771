"""A user's own side of the edge: the user store and its migrations (`store`, `schema`,
`files`, `limits`, `models`), personalization per request (`personalizer`, `samples`,
`resident`), and the per-user n-gram cache mixed into the model's logits (`adapt`)."""
