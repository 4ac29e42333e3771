"""The serving layer both HTTP APIs share (edge and cloud), torch-free.

`protocol` (OpenAI request/response schema and chunk builders), `errors` (OpenAI's error
envelope, one translation from error codes), `bodies` (strict, size-limited JSON bodies),
`auth` (bearer keys), `sse` (streams that always end with `[DONE]`), `metrics` (Prometheus,
health routes, `install_common`). An API is assembled like this::

    app = FastAPI(lifespan=lifespan)
    metrics = install_common(app, service="edge", max_body_bytes=1 << 20, ready_check=ready)
    auth = require_api_key(settings.api_keys)           # empty -> open (dev mode)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: Annotated[CompletionRequest, Depends(json_body(...))]):
        ...
        if req.stream:
            return await sse_response(chunks())   # chunks(): async iterator of protocol models
        return JSONResponse(completion_response(..., served_by="edge").body())
"""
