/* score.c — Generation/Score: a text's per-token log-probabilities, computed
 * by the batch engine among the running requests (eng_engine_score), on the
 * generation worker pool (the call waits for the engine there). */
#include "internal.h"

static void wake(void *ud) { srv__wake_engine_locked(ud); }

void srv__h_score(call *c) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__ScoreRequest, kvserve__v1__score_request__descriptor, c, q);
    eng_request r;
    memset(&r, 0, sizeof r);
    r.tenant = c->tenant;
    if (q->text && q->text[0]) {
        r.text = q->text;
        r.text_len = strlen(q->text);
        r.add_special = q->add_special_tokens;
    } else {
        r.ids = q->ids;
        r.n_ids = q->n_ids;
    }
    int32_t *ids = NULL;
    double *lp = NULL;
    size_t n = 0;
    char err[512];
    int rc = eng_engine_score(s->eng, &r, wake, s, &ids, &lp, &n, err, sizeof err);
    if (rc) {
        /* the engine names the prompt ("prompt: ...", "scoring needs ..."); the field here is text or ids */
        srv__finish_errorf(c, srv__status_of(rc), "%s: %s", q->text && q->text[0] ? "text" : "ids", err);
    } else {
        Kvserve__V1__ScoreReply rep = KVSERVE__V1__SCORE_REPLY__INIT;
        rep.token_ids = ids;
        rep.n_token_ids = n;
        rep.logprobs = lp;
        rep.n_logprobs = n - 1;
        double sum = 0;
        for (size_t i = 0; i + 1 < n; i++) sum += lp[i];
        rep.perplexity = exp(-sum / (double)(n - 1));
        srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    free(ids);
    free(lp);
    kvserve__v1__score_request__free_unpacked(q, NULL);
}
