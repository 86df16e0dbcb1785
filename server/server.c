/* server.c — srv_open, srv_serve, srv_shutdown: start-up, the engine thread,
 * signals, graceful shutdown, and the one clean-up path */
#include "internal.h"

/* Test hook (KVSERVE_TEST_HOLD_FILE, docs/testing.md): while the file exists,
 * no request generates more tokens than the number written in it (0 if it
 * holds none). Returns the hold, or -1 when the file is absent. */
static int read_hold(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0;
    if (fscanf(f, "%d", &n) != 1 || n < 0) n = 0;
    fclose(f);
    return n;
}

static void *engine_loop(void *p) {
    srv *s = p;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        int stop = s->stop_engine;
        pthread_mutex_unlock(&s->mu);
        if (stop) break;
        int held = -1;
        if (s->cfg.test_hold_file) eng_engine_hold(s->eng, held = read_hold(s->cfg.test_hold_file));
        int n = eng_step(s->eng, srv__on_event, s);
        if (n > 0) srv_metrics_step(s->metrics, n);
        int parked = srv__check_parked(s, 0);
        if (n == 0) {
            pthread_mutex_lock(&s->mu);
            if (!s->work && !s->stop_engine) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                long wait_ns = parked || held >= 0 ? 5000000L : 200000000L; /* a held test polls its file */
                ts.tv_nsec += wait_ns;
                if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
                pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            }
            s->work = 0;
            pthread_mutex_unlock(&s->mu);
        }
    }
    return NULL;
}

/* The signal pipe: process-wide by nature, written by the handler only. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t r = write(sig_pipe[1], &b, 1);
    (void)r;
    errno = saved;
}

static void free_files(srv *s) {
    srv__desc_close(s->desc);
    s->desc = NULL;
}


/* The Redis pool's news, once per change: an operator sees "NOAUTH", "Connection refused", ... */
static void redis_problem(void *ud, const char *msg) {
    (void)ud;
    if (!strcmp(msg, "ok")) LOG_INFO("redis: working again (the caches are back)");
    else LOG_WARN("redis: %s (the caches fail open: requests go on without them)", msg);
}

/* Every connection is a descriptor: take all the process may have (the soft
 * limit, often 1024, up to the hard one), so that clients run out of
 * patience before the server runs out of descriptors. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
            LOG_INFO("descriptor limit raised from %llu to %llu", (unsigned long long)was,
                     (unsigned long long)rl.rlim_max);
    }
}

/* Set up: settings, tokens, keys, metrics, caches, signals, the gRPC
 * server (listening, health NOT_SERVING), threads, then the model. On a
 * problem: one line on stderr, everything undone, and the exit code. */
int srv_open(srv **out, const srv_config *cfg) {
    *out = NULL;
    srv *s = calloc(1, sizeof *s);
    if (!s) return 1;
    raise_fd_limit();
    s->cfg = *cfg;
    if (s->cfg.cq_threads <= 0) s->cfg.cq_threads = 2;
    if (s->cfg.worker_threads <= 0) s->cfg.worker_threads = 2;
    if (s->cfg.grace_seconds < 0) s->cfg.grace_seconds = 10;
    if (s->cfg.max_wait_ms <= 0) s->cfg.max_wait_ms = 10000;
    if (s->cfg.max_message_bytes <= 0) s->cfg.max_message_bytes = 64 << 20;
    if (s->cfg.max_results <= 0) s->cfg.max_results = 1024;
    if (s->cfg.result_ttl_s <= 0) s->cfg.result_ttl_s = 600;
    pthread_mutex_init(&s->rq_mu, NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->jobs_mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->jobs_cv, NULL);
    int rc = 2;
    char why[512];
    if (srv_config_check(&s->cfg, why, sizeof why)) {
        fprintf(stderr, "kvserve: %s\n", why);
        goto fail;
    }
    if (!(s->reg = srv__reg_new()) ||
        srv__desc_open(&s->desc, kvserve_descriptor_set, kvserve_descriptor_set_len)) {
        fprintf(stderr, "kvserve: out of memory\n");
        rc = 1;
        goto fail;
    }
    if (s->cfg.token_file && srv__load_tokens(s, s->cfg.token_file)) goto fail; /* (it says why) */
    if (srv__agent_key_init(&s->akey, s->cfg.export_key_file, why, sizeof why)) {
        fprintf(stderr, "kvserve: %s\n", why);
        goto fail;
    }
    s->metrics = srv_metrics_new(s->cfg.price_per_1k);
    if (s->cfg.metrics_listen && s->metrics && srv_metrics_listen(s->metrics, s->cfg.metrics_listen, srv__metrics_source, s)) {
        fprintf(stderr, "kvserve: --metrics %s: cannot listen (an IPv4 HOST:PORT, free)\n", s->cfg.metrics_listen);
        goto fail;
    }
    if (s->cfg.redis_url) { /* Redis may be down now: the cache is fail-open */
        char err[256] = "";
        kvc_redis_options ro = {.url = s->cfg.redis_url, .connect_timeout_ms = s->cfg.redis_timeout_ms,
                                .command_timeout_ms = s->cfg.redis_timeout_ms, .on_problem = redis_problem};
        kvc_prompt_options po = {.default_ttl_s = s->cfg.cache_ttl_s};
        int bad = kvc_redis_open(&s->redis, &ro, err, sizeof err) != KVC_OK;
        if (!bad && kvc_prompt_open(&s->pcache, s->redis, &po) != KVC_OK)
            bad = snprintf(err, sizeof err, "out of memory opening the prompt cache") > 0;
        if (!bad && kvc_rag_open(&s->rag, s->redis, NULL) != KVC_OK)
            bad = snprintf(err, sizeof err, "out of memory opening the RAG cache") > 0;
        if (bad) {
            fprintf(stderr, "kvserve: --redis: %s\n", err);
            goto fail;
        }
        s->has_writer = pthread_create(&s->writer, NULL, srv__writer_loop, s) == 0;
        if (!s->has_writer) { /* queued writes would wait for ever */
            fprintf(stderr, "kvserve: cannot start the cache writer thread: %s\n", strerror(errno));
            goto fail;
        }
    }

    /* SIGTERM / SIGINT write to a pipe from whatever thread takes them (the
     * BLAS library starts threads before main, so masks cannot route them) */
    if (pipe(sig_pipe) != 0) {
        fprintf(stderr, "kvserve: pipe: %s\n", strerror(errno));
        goto fail;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    grpc_init();
    s->grpc_inited = 1;
    grpc_server_credentials *creds = srv__make_creds(&s->cfg);
    if (!creds) goto fail; /* (it says why) */
    grpc_arg args[3];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = s->cfg.max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = s->cfg.max_message_bytes;
    args[2].type = GRPC_ARG_INTEGER; /* a second server on the same port must fail, not share it */
    args[2].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[2].value.integer = 0;
    grpc_channel_args cargs = {3, args};
    s->server = grpc_server_create(&cargs, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    s->rm = calloc(N_METHODS, sizeof *s->rm);
    for (int i = 0; i < N_METHODS; i++)
        s->rm[i] = grpc_server_register_method(s->server, srv__methods[i].path, NULL,
                                               srv__methods[i].k == K_BIDI ? GRPC_SRM_PAYLOAD_NONE
                                                                      : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
                                               0);
    int port = grpc_server_add_http2_port(s->server, s->cfg.listen, creds);
    grpc_server_credentials_release(creds);
    if (!port) {
        fprintf(stderr, "kvserve: cannot listen on %s (address in use or invalid)\n", s->cfg.listen);
        goto fail;
    }
    if (s->cfg.http_listen && srv__loop_listen(s) != 0) {
        fprintf(stderr, "kvserve: --http: cannot make the loopback socket in %s\n", s->loop_dir[0] ? s->loop_dir : "$TMPDIR");
        goto fail;
    }
    grpc_server_start(s->server);
    s->started = 1;
    s->started_at = (long)time(NULL);
    { /* the HTTP API's model name: --served-model-name, else the model path's last part */
        const char *name = s->cfg.served_model_name;
        char buf[256];
        if (!name || !name[0]) {
            snprintf(buf, sizeof buf, "%s", s->cfg.model_dir);
            size_t n = strlen(buf);
            while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
            char *slash = strrchr(buf, '/');
            name = slash && slash[1] ? slash + 1 : buf;
        }
        snprintf(s->model_name, sizeof s->model_name, "%s", name);
    }
    for (int p = POOL_GENERATE; p <= POOL_REDIS; p++)
        if (srv__workers_open(&s->pools[p], s->cfg.worker_threads) != 0)
            LOG_WARN("could not start worker threads: handlers that may block run on the completion-queue threads");
    s->cq_thr = calloc((size_t)s->cfg.cq_threads, sizeof *s->cq_thr);
    for (int i = 0; s->cq_thr && i < s->cfg.cq_threads; i++, s->n_cq++)
        if (pthread_create(&s->cq_thr[i], NULL, srv__cq_loop, s) != 0) break;
    if (s->n_cq == 0) {
        fprintf(stderr, "kvserve: cannot start the completion-queue threads: %s\n", strerror(errno));
        goto fail;
    }
    if (s->n_cq < s->cfg.cq_threads) LOG_WARN("could start only %d of %d completion-queue threads", s->n_cq, s->cfg.cq_threads);
    for (int i = -1; i < N_METHODS; i++) srv__request_call(s, i);
    if (s->cfg.http_listen) { /* (answers 503 until the model is loaded) */
        char herr[256];
        if (srv__http_start(s, herr, sizeof herr)) {
            fprintf(stderr, "kvserve: %s\n", herr);
            goto fail;
        }
        LOG_INFO("HTTP API (OpenAI-compatible) on %s, model \"%s\"", s->cfg.http_listen, s->model_name);
    }
    LOG_INFO("listening on %s (port %d)%s%s; loading %s", s->cfg.listen, port, s->cfg.tls_cert ? ", TLS" : "",
             s->cfg.tls_client_ca ? " + client certificates" : "", s->cfg.model_dir);

    /* the model, while health says NOT_SERVING */
    char err[512] = "";
    eng_options eo = {.n_threads = s->cfg.threads, .max_context = s->cfg.max_context,
                      .weights = s->cfg.weights, .kv_f16 = s->cfg.kv_f16};
    double t0 = srv__now_s();
    int lrc = eng_model_open(&s->model, s->cfg.model_dir, &eo, err, sizeof err);
    if (!lrc) lrc = eng_engine_open(&s->eng, s->model, &s->cfg.engine, err, sizeof err);
    if (!lrc && eng_chat_open(&s->chat, s->cfg.model_dir, s->chat_why, sizeof s->chat_why) != ENG_OK) {
        LOG_INFO("no chat template: %s (requests with messages are refused)", s->chat_why);
        s->chat = NULL;
    }
    srv__batcher_options bo = {s->cfg.batch_max, s->cfg.batch_window_ms, s->cfg.batch_queue};
    if (!lrc && srv__batcher_open(&s->batcher, &bo, srv__on_batch, srv__on_batch_drop, s) != 0) {
        snprintf(err, sizeof err, "batcher: out of memory");
        lrc = ENG_ENOMEM;
    }
    if (lrc) {
        fprintf(stderr, "kvserve: %s\n", err);
        goto fail;
    }
    if (srv__agents_open(s, err, sizeof err) != 0) {
        fprintf(stderr, "kvserve: --agent-save-after: %s\n", err);
        goto fail;
    }
    if (pthread_create(&s->eng_thr, NULL, engine_loop, s) != 0) {
        fprintf(stderr, "kvserve: cannot start the engine thread: %s\n", strerror(errno));
        goto fail;
    }
    s->has_eng_thr = 1;
    eng_stats st;
    eng_stats_get(s->eng, &st);
    LOG_INFO("model loaded in %.2fs: %s files, weights held in %s (%zu MiB), %d %s KV blocks of %d tokens, "
             "BLAS kernels %s; serving",
             srv__now_s() - t0, eng_model_config(s->model)->dtype, eng_model_weights(s->model) == ENG_WEIGHTS_Q8_0 ? "Q8_0"
             : eng_model_weights(s->model) == ENG_WEIGHTS_Q4_K ? "K-quants (Q4_K/Q6_K)"
             : eng_model_weights(s->model) == ENG_WEIGHTS_BF16 ? "BF16" : "F32",
             eng_model_weight_bytes(s->model) >> 20, st.blocks_total, s->cfg.kv_f16 ? "F16" : "F32",
             st.block_tokens, eng_blas_core());
    if (eng_model_warning(s->model)) LOG_WARN("%s", eng_model_warning(s->model));
    if (eng_blas_note())
        LOG_INFO("BLAS: OpenBLAS would have run its %s kernels on this AVX-512 CPU; switched to %s "
                 "(KVSERVE_BLAS_CORE=keep to keep them)", eng_blas_note(), eng_blas_core());
    if (s->akey.generated)
        LOG_INFO("agent exports are signed with a key made at start: they import only into this process "
                 "(--export-key FILE to keep one across restarts and replicas)");
    if (s->cfg.test_hold_file)
        LOG_WARN("test hook KVSERVE_TEST_HOLD_FILE=%s: while that file exists, requests are held at the "
                 "number of tokens it holds", s->cfg.test_hold_file);
    *out = s;
    return 0;
fail:
    srv_shutdown(s);
    return rc;
}

/* SERVING until SIGTERM or SIGINT. */
int srv_serve(srv *s) {
    pthread_mutex_lock(&s->mu);
    s->ready = 1;
    s->serving = 1;
    srv__notify_watchers(s);
    pthread_mutex_unlock(&s->mu);
    unsigned char sig = 0;
    while (read(sig_pipe[0], &sig, 1) < 0 && errno == EINTR) {}
    LOG_INFO("signal %d: shutting down (grace %.1fs)", sig, s->cfg.grace_seconds);
    return 0;
}

/* Graceful shutdown after srv_serve, and the one clean-up path of
 * srv_open: each step undoes only what was done. */
void srv_shutdown(srv *s) {
    if (!s) return;
    if (s->started) {
        /* Graceful shutdown. From here new generation, agent and cache-admin
         * calls are refused (UNAVAILABLE; Step and Cancel go on), and only then
         * do watchers hear NOT_SERVING, so
         * that a client that has seen it can count on it. Streams, parked Steps,
         * what waits in the batcher and Submitted requests get the grace to
         * finish, and what finishes meanwhile stays collectable by Step. */
        pthread_mutex_lock(&s->mu);
        s->serving = 0;
        s->shutting_down = 1;
        srv__notify_watchers(s);
        int in_flight = s->active_calls;
        pthread_mutex_unlock(&s->mu);
        LOG_INFO("draining: %d call%s in flight", in_flight, in_flight == 1 ? "" : "s");
        double drain_start = srv__now_s(), until = drain_start + s->cfg.grace_seconds;
        for (;;) {
            pthread_mutex_lock(&s->rq_mu); /* both: a request leaves the batcher's count as it joins the registry */
            pthread_mutex_lock(&s->mu);
            int busy = s->active_calls > 0 || s->parked || s->pending || srv__reg_running_steps(s->reg) > 0 ||
                       srv__reg_newest_done_at(s->reg) >= drain_start;
            pthread_mutex_unlock(&s->mu);
            pthread_mutex_unlock(&s->rq_mu);
            if (!busy || srv__now_s() >= until) break;
            srv__sleep_ms(20);
        }
        pthread_mutex_lock(&s->mu); /* from here a handler finds no batcher (UNAVAILABLE) */
        srv__batcher *batcher = s->batcher;
        s->batcher = NULL;
        pthread_mutex_unlock(&s->mu);
        srv__batcher_close(batcher); /* what still waits is refused (UNAVAILABLE) */
        /* past the grace: cancel the engine requests first, so that each stream
         * still gets its completion (finish CANCELLED) and status OK, and each
         * Submitted request a CANCELLED completion for Step */
        if (s->has_eng_thr) {
            pthread_mutex_lock(&s->rq_mu);
            size_t n = 0, cap = 0;
            uint64_t *ids = NULL;
            for (srv_reg_entry *e = srv__reg_first(s->reg); e; e = e->next) {
                if (e->done) continue;
                if (n == cap) {
                    uint64_t *ni = realloc(ids, (cap = cap ? cap * 2 : 64) * sizeof *ni);
                    if (!ni) break;
                    ids = ni;
                }
                ids[n++] = e->id;
            }
            pthread_mutex_unlock(&s->rq_mu);
            for (size_t i = 0; i < n; i++) eng_cancel(s->eng, ids[i]);
            free(ids);
            srv__wake_engine_locked(s);
            for (int i = 0; i < 100; i++) { /* up to a second for those completions to go out */
                pthread_mutex_lock(&s->rq_mu);
                pthread_mutex_lock(&s->mu);
                int left = s->active_calls || srv__reg_running_steps(s->reg) > 0;
                pthread_mutex_unlock(&s->mu);
                pthread_mutex_unlock(&s->rq_mu);
                if (!left) break;
                srv__sleep_ms(10);
            }
            srv__check_parked(s, 1); /* parked Steps take what came, the CANCELLED completions included */
        }
        /* Health watchers end with a status after their NOT_SERVING, before the
         * calls left are cancelled: a cancel could cut the message off the wire. */
        pthread_mutex_lock(&s->mu);
        for (call *w = s->watchers; w; w = w->next_watch) srv__stream_end(w, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < 500; i++) { /* up to 5 s: each leaves the list once its client has the status */
            pthread_mutex_lock(&s->mu);
            int left = s->watchers != NULL;
            pthread_mutex_unlock(&s->mu);
            if (!left) break;
            srv__sleep_ms(10);
        }
        srv__cq_dispatch(NULL, srv__on_shutdown, &s->t_shutdown);
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
        grpc_server_cancel_all_calls(s->server);
        for (int i = 0; i < 500; i++) { /* the cancelled streams' completions come through the engine */
            pthread_mutex_lock(&s->mu);
            int left = s->active_calls, done = s->shutdown_done;
            pthread_mutex_unlock(&s->mu);
            if ((!left || !s->has_eng_thr) && done) break;
            srv__sleep_ms(10);
        }
        srv__http_stop(s); /* its calls were cancelled with the rest: its threads end */
        for (int p = POOL_GENERATE; p <= POOL_REDIS; p++) { /* the handlers still queued there run (and refuse) */
            srv__workers_close(s->pools[p]);
            s->pools[p] = NULL;
        }
        if (s->has_eng_thr) {
            pthread_mutex_lock(&s->mu);
            s->stop_engine = 1;
            pthread_cond_signal(&s->cv);
            pthread_mutex_unlock(&s->mu);
            pthread_join(s->eng_thr, NULL);
        }
    }
    for (int p = POOL_GENERATE; p <= POOL_REDIS; p++) srv__workers_close(s->pools[p]); /* (when never started) */
    if (s->has_writer) { /* finish the cache writes already queued */
        pthread_mutex_lock(&s->jobs_mu);
        s->writer_stop = 1;
        pthread_cond_signal(&s->jobs_cv);
        pthread_mutex_unlock(&s->jobs_mu);
        pthread_join(s->writer, NULL);
    }
    /* followers of flights that never finished: their calls were cancelled */
    for (flight *f = s->flights, *fn; f; f = fn) {
        fn = f->next;
        for (follower *w = f->followers, *n; w; w = n) {
            n = w->next;
            srv__call_unref(w->c);
            free(w);
        }
        free(f);
    }
    s->flights = NULL;
    /* drop what is left of the watchers and records */
    pthread_mutex_lock(&s->mu);
    call *w = s->watchers;
    s->watchers = NULL;
    pthread_mutex_unlock(&s->mu);
    for (call *n; w; w = n) {
        n = w->next_watch;
        srv__call_unref(w);
    }
    srv__http_stop(s);
    srv__loop_close(s);
    if (s->server) grpc_server_destroy(s->server);
    if (s->cq) {
        grpc_completion_queue_shutdown(s->cq);
        for (int i = 0; i < s->n_cq; i++) pthread_join(s->cq_thr[i], NULL);
        if (!s->n_cq) /* nobody drains it */
            while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {}
        grpc_completion_queue_destroy(s->cq);
    }
    for (srv_reg_entry *e = s->reg ? srv__reg_first(s->reg) : NULL, *n; e; e = n) {
        rec *r = (rec *)e;
        n = e->next;
        if (r->stream) srv__call_unref(r->stream);
        srv__rec_free(r);
    }
    srv_metrics_free(s->metrics); /* stops its HTTP thread first: it reads the engine and caches */
    s->metrics = NULL;
    srv__agents_close(s); /* after the last step: the agents not yet in Redis go there */
    eng_engine_close(s->eng);
    eng_chat_close(s->chat);
    eng_model_close(s->model);
    if (s->grpc_inited) grpc_shutdown();
    free_files(s);
    kvc_rag_close(s->rag);
    kvc_prompt_close(s->pcache);
    kvc_redis_close(s->redis);
    pthread_cond_destroy(&s->jobs_cv);
    free(s->cq_thr);
    free(s->rm);
    free(s->tokens);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->rq_mu);
    pthread_mutex_destroy(&s->jobs_mu);
    pthread_cond_destroy(&s->cv);
    if (s->reg) srv__reg_free(s->reg);
    OPENSSL_cleanse(&s->akey, sizeof s->akey);
    int served = s->started;
    free(s);
    if (sig_pipe[0] >= 0) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        close(sig_pipe[0]);
        close(sig_pipe[1]);
        sig_pipe[0] = sig_pipe[1] = -1;
    }
    if (served) LOG_INFO("stopped");
}

int srv_run(const srv_config *cfg) {
    srv *s;
    int rc = srv_open(&s, cfg);
    if (rc) return rc;
    rc = srv_serve(s);
    srv_shutdown(s);
    return rc;
}
