/* agents.c — the Agents service */
#include "internal.h"

static void agent_msg(const eng_agent_info *i, Kvserve__V1__AgentInfo *a) {
    kvserve__v1__agent_info__init(a);
    a->agent_id = (char *)i->agent_id;
    a->tokens = i->n_tokens;
    a->cached_tokens = i->n_cached;
    a->blocks = i->n_blocks;
    a->busy = i->busy;
    a->idle_seconds = i->idle_seconds;
    a->saved = i->saved;
}

static int check_agent_id(call *c, const char *id) {
    if (!id || !id[0]) {
        srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "agent_id: required");
        return -1;
    }
    return 0;
}

void srv__h_get_agent(call *c) {
    UNPACK(Kvserve__V1__AgentRequest, kvserve__v1__agent_request__descriptor, c, q);
    eng_agent_info info;
    if (!check_agent_id(c, q->agent_id)) {
        if (eng_agent_get(c->s->eng, c->tenant, q->agent_id, &info) != ENG_OK)
            srv__finish_errorf(c, GRPC_STATUS_NOT_FOUND, "agent_id: no agent \"%s\"", q->agent_id);
        else {
            Kvserve__V1__AgentInfo a;
            agent_msg(&info, &a);
            srv__finish_call(c, GRPC_STATUS_OK, NULL, &a.base);
        }
    }
    kvserve__v1__agent_request__free_unpacked(q, NULL);
}

void srv__h_list_agents(call *c) {
    eng_agent_info *infos = NULL;
    int n = eng_agent_list(c->s->eng, c->tenant, NULL, 0), got = 0;
    if (n > 0 && (infos = calloc((size_t)n, sizeof *infos))) got = eng_agent_list(c->s->eng, c->tenant, infos, n);
    if (got > n) got = n;
    Kvserve__V1__ListAgentsReply rep = KVSERVE__V1__LIST_AGENTS_REPLY__INIT;
    Kvserve__V1__AgentInfo *msgs = calloc((size_t)(got ? got : 1), sizeof *msgs);
    Kvserve__V1__AgentInfo **ptrs = calloc((size_t)(got ? got : 1), sizeof *ptrs);
    if (msgs && ptrs)
        for (int i = 0; i < got; i++) {
            agent_msg(&infos[i], &msgs[i]);
            ptrs[i] = &msgs[i];
        }
    rep.n_agents = msgs && ptrs ? (size_t)got : 0;
    rep.agents = ptrs;
    srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    free(msgs);
    free(ptrs);
    free(infos);
}

void srv__h_drop_agent(call *c) {
    UNPACK(Kvserve__V1__AgentRequest, kvserve__v1__agent_request__descriptor, c, q);
    if (!check_agent_id(c, q->agent_id)) {
        int rc = eng_agent_drop(c->s->eng, c->tenant, q->agent_id);
        if (rc != ENG_EBUSY && srv__agent_forget(c->s, c->tenant, q->agent_id) == KVC_OK && rc == ENG_ENOTFOUND)
            rc = ENG_OK; /* it was only in Redis */
        if (rc == ENG_ENOTFOUND) srv__finish_errorf(c, GRPC_STATUS_NOT_FOUND, "agent_id: no agent \"%s\"", q->agent_id);
        else if (rc) srv__finish_errorf(c, srv__status_of(rc), "agent \"%s\": %s", q->agent_id, eng_strerror(rc));
        else {
            Kvserve__V1__DropAgentReply rep = KVSERVE__V1__DROP_AGENT_REPLY__INIT;
            srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
        }
    }
    kvserve__v1__agent_request__free_unpacked(q, NULL);
}

void srv__h_export_agent(call *c) {
    UNPACK(Kvserve__V1__AgentRequest, kvserve__v1__agent_request__descriptor, c, q);
    if (!check_agent_id(c, q->agent_id)) {
        uint8_t *buf;
        size_t len;
        char err[256];
        srv__agent_fetch(c->s, c->tenant, q->agent_id, 0); /* (from Redis, if it is only there) */
        int rc = eng_agent_export(c->s->eng, c->tenant, q->agent_id, &buf, &len, err, sizeof err);
        if (!rc && srv__agent_seal(&c->s->akey, eng_model_fingerprint(c->s->model), c->tenant, &buf, &len)) {
            free(buf);
            rc = ENG_ENOMEM;
            snprintf(err, sizeof err, "out of memory");
        }
        if (rc) srv__finish_call(c, srv__status_of(rc), err, NULL);
        else {
            Kvserve__V1__ExportAgentReply rep = KVSERVE__V1__EXPORT_AGENT_REPLY__INIT;
            rep.data.data = buf;
            rep.data.len = len;
            srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
            free(buf);
        }
    }
    kvserve__v1__agent_request__free_unpacked(q, NULL);
}

void srv__h_import_agent(call *c) {
    UNPACK(Kvserve__V1__ImportAgentRequest, kvserve__v1__import_agent_request__descriptor, c, q);
    if (!check_agent_id(c, q->agent_id)) {
        char err[256];
        size_t n = 0;
        int rc = ENG_ECORRUPT;
        if (srv__agent_verify(&c->s->akey, eng_model_fingerprint(c->s->model), c->tenant, q->data.data, q->data.len, &n))
            snprintf(err, sizeof err, "not an export of this server for this tenant (its signature does not verify: "
                                      "altered, truncated, another tenant's, or signed with another --export-key)");
        else
            rc = eng_agent_import(c->s->eng, c->tenant, q->agent_id, q->data.data, n, err, sizeof err);
        eng_agent_info info;
        if (rc) srv__finish_errorf(c, srv__status_of(rc), "data: %s", err);
        else if (eng_agent_get(c->s->eng, c->tenant, q->agent_id, &info) == ENG_OK) {
            Kvserve__V1__AgentInfo a;
            agent_msg(&info, &a);
            srv__finish_call(c, GRPC_STATUS_OK, NULL, &a.base);
        } else srv__finish_errorf(c, GRPC_STATUS_INTERNAL, "agent vanished after import");
    }
    kvserve__v1__import_agent_request__free_unpacked(q, NULL);
}
