"""The edge's HTTP surface: the OpenAI routes (`app`), the user routes (`users`) and the
personalization of a request as the routes hand it to the router (`personal`)."""
