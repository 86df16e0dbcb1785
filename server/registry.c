/* registry.c — requests by id: a chained hash table, a list of every entry,
 * the finished entries in finishing order and per-tenant counts (see
 * registry.h). Runs under srv.rq_mu. */
#include "registry.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    char *tenant;
    int n;
} tenant_count;

struct srv_reg {
    srv_reg_entry **bucket;
    size_t n_bucket, n;
    size_t n_running_step;               /* Step-collected entries not finished */
    srv_reg_entry *head;                 /* every entry */
    srv_reg_entry *dhead, *dtail;        /* finished, oldest first */
    tenant_count *tc;                    /* few: one per tenant of the token file */
    size_t n_tc, cap_tc;
};

static size_t slot(const srv_reg *g, uint64_t id) {
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdull;
    id ^= id >> 33;
    return (size_t)id & (g->n_bucket - 1);
}

srv_reg *srv__reg_new(void) {
    srv_reg *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->n_bucket = 256;
    if (!(g->bucket = calloc(g->n_bucket, sizeof *g->bucket))) { free(g); return NULL; }
    return g;
}

void srv__reg_free(srv_reg *g) {
    if (!g) return;
    for (size_t i = 0; i < g->n_tc; i++) free(g->tc[i].tenant);
    free(g->tc);
    free(g->bucket);
    free(g);
}

static tenant_count *count_of(srv_reg *g, const char *tenant, int create) {
    for (size_t i = 0; i < g->n_tc; i++)
        if (!strcmp(g->tc[i].tenant, tenant)) return &g->tc[i];
    if (!create) return NULL;
    if (g->n_tc == g->cap_tc) {
        size_t nc = g->cap_tc ? g->cap_tc * 2 : 8;
        tenant_count *t = realloc(g->tc, nc * sizeof *t);
        if (!t) return NULL;
        g->tc = t;
        g->cap_tc = nc;
    }
    if (!(g->tc[g->n_tc].tenant = strdup(tenant))) return NULL;
    g->tc[g->n_tc].n = 0;
    return &g->tc[g->n_tc++];
}

static void grow(srv_reg *g) {
    size_t nb = g->n_bucket * 2;
    srv_reg_entry **b = calloc(nb, sizeof *b);
    if (!b) return; /* longer chains, still correct */
    srv_reg_entry **old = g->bucket;
    size_t on = g->n_bucket;
    g->bucket = b;
    g->n_bucket = nb;
    for (size_t i = 0; i < on; i++)
        for (srv_reg_entry *e = old[i], *n; e; e = n) {
            n = e->hnext;
            size_t k = slot(g, e->id);
            e->hnext = b[k];
            b[k] = e;
        }
    free(old);
}

int srv__reg_add(srv_reg *g, srv_reg_entry *e) {
    if (e->collected_by_step) {
        tenant_count *t = count_of(g, e->tenant, 1);
        if (!t) return -1;
        t->n++;
        g->n_running_step++;
    }
    if (g->n + 1 > g->n_bucket * 2) grow(g);
    size_t k = slot(g, e->id);
    e->hnext = g->bucket[k];
    g->bucket[k] = e;
    e->prev = NULL;
    e->next = g->head;
    if (g->head) g->head->prev = e;
    g->head = e;
    e->done = 0;
    e->dprev = e->dnext = NULL;
    g->n++;
    return 0;
}

srv_reg_entry *srv__reg_find(srv_reg *g, uint64_t id) {
    for (srv_reg_entry *e = g->bucket[slot(g, id)]; e; e = e->hnext)
        if (e->id == id) return e;
    return NULL;
}

static void unlink_done(srv_reg *g, srv_reg_entry *e) {
    if (e->dprev) e->dprev->dnext = e->dnext; else g->dhead = e->dnext;
    if (e->dnext) e->dnext->dprev = e->dprev; else g->dtail = e->dprev;
    e->dprev = e->dnext = NULL;
}

void srv__reg_remove(srv_reg *g, srv_reg_entry *e) {
    for (srv_reg_entry **pp = &g->bucket[slot(g, e->id)]; *pp; pp = &(*pp)->hnext)
        if (*pp == e) {
            *pp = e->hnext;
            break;
        }
    if (e->prev) e->prev->next = e->next; else g->head = e->next;
    if (e->next) e->next->prev = e->prev;
    if (e->done) unlink_done(g, e);
    if (e->collected_by_step) {
        tenant_count *t = count_of(g, e->tenant, 0);
        if (t) t->n--;
        if (!e->done) g->n_running_step--;
    }
    e->prev = e->next = e->hnext = NULL;
    g->n--;
}

void srv__reg_done(srv_reg *g, srv_reg_entry *e, double now) {
    if (e->done) return;
    e->done = 1;
    e->done_at = now;
    if (e->collected_by_step) g->n_running_step--;
    e->dnext = NULL;
    e->dprev = g->dtail;
    if (g->dtail) g->dtail->dnext = e; else g->dhead = e;
    g->dtail = e;
}

srv_reg_entry *srv__reg_oldest_done_before(srv_reg *g, double before) {
    return g->dhead && g->dhead->done_at < before ? g->dhead : NULL;
}

int srv__reg_tenant_count(const srv_reg *g, const char *tenant) {
    tenant_count *t = count_of((srv_reg *)g, tenant, 0);
    return t ? t->n : 0;
}

size_t srv__reg_running_steps(const srv_reg *g) { return g->n_running_step; }

double srv__reg_newest_done_at(const srv_reg *g) { return g->dtail ? g->dtail->done_at : -1; }

srv_reg_entry *srv__reg_first(srv_reg *g) { return g->head; }

size_t srv__reg_size(const srv_reg *g) { return g->n; }
