"""Where each request is served: the rules (`rules`, pure), the one place the route is decided
(`router`), the request and the items its answer streams as (`request`), A/B variants
(`experiments`) and the cloud link (`cloud`, I/O only)."""
