/* chat.c — a model's chat template (eng.h, "chat templates"): found in
 * tokenizer_config.json (or chat_template.jinja), parsed once by jinja.c,
 * rendered by jinja_run.c against a context of messages and the model's
 * special tokens. */
#include "internal.h"
#include "jinja.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct eng_chat {
    eng__jinja *tpl;
    char *bos, *eos;        /* NULL: the config has none */
};

/* A special token as tokenizer_config.json writes it: "text" or {"content": "text"}. */
static int token_text(const cJSON *cfg, const char *key, char **out) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(t)) t = cJSON_GetObjectItemCaseSensitive(t, "content");
    *out = NULL;
    if (!cJSON_IsString(t)) return ENG_OK;
    return (*out = strdup(t->valuestring)) ? ENG_OK : ENG_ENOMEM;
}

/* The template source: a string, or the entry named "default" of a list of {name, template}. */
static int template_text(const cJSON *ct, const char *path, const char **src, char *err, size_t errlen) {
    if (cJSON_IsString(ct)) { *src = ct->valuestring; return ENG_OK; }
    if (!cJSON_IsArray(ct))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: chat_template is neither a string nor a list of templates", path);
    const cJSON *it;
    cJSON_ArrayForEach(it, ct) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(it, "name");
        const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(it, "template");
        if (cJSON_IsString(name) && !strcmp(name->valuestring, "default") && cJSON_IsString(tpl)) {
            *src = tpl->valuestring;
            return ENG_OK;
        }
    }
    return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: chat_template lists no template named \"default\"", path);
}

static int parse_template(eng_chat *c, const char *src, size_t len, const char *where, char *err, size_t errlen) {
    char why[480];
    int rc = eng__jinja_parse(src, len, &c->tpl, why, sizeof why);
    return rc ? eng__fail(err, errlen, rc, "%s: %s", where, why) : ENG_OK;
}

/* No chat_template in the config: chat_template.jinja in the same directory, if there is one. */
static int template_file(eng_chat *c, const char *cfg_path, char *err, size_t errlen) {
    char path[4096];
    const char *slash = strrchr(cfg_path, '/');
    int dir_len = slash ? (int)(slash - cfg_path + 1) : 0;
    snprintf(path, sizeof path, "%.*schat_template.jinja", dir_len, cfg_path);
    struct stat sb;
    if (stat(path, &sb) != 0)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s has no chat_template (and there is no chat_template.jinja beside it)",
                         cfg_path);
    char *src;
    size_t len;
    int rc = eng__read_file(path, &src, &len, err, errlen);
    if (rc) return rc;
    rc = parse_template(c, src, len, path, err, errlen);
    free(src);
    return rc;
}

static int load_config(eng_chat *c, const char *path, char *err, size_t errlen) {
    char *text;
    size_t len;
    int rc = eng__read_file(path, &text, &len, err, errlen);
    if (rc) return rc;
    cJSON *cfg = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: not a JSON object", path);
    }
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    const char *src = NULL;
    if ((rc = token_text(cfg, "bos_token", &c->bos)) || (rc = token_text(cfg, "eos_token", &c->eos)))
        rc = eng__fail(err, errlen, rc, "out of memory");
    else if (!ct || cJSON_IsNull(ct)) rc = template_file(c, path, err, errlen);
    else if (!(rc = template_text(ct, path, &src, err, errlen))) rc = parse_template(c, src, strlen(src), path, err, errlen);
    cJSON_Delete(cfg);
    return rc;
}

/* A GGUF file's tokenizer.chat_template and special tokens. */
static int load_gguf(eng_chat *c, const char *path, char *err, size_t errlen) {
    eng__gguf f;
    int rc = eng__gguf_open(&f, path, err, errlen);
    if (rc) return rc;
    char *tpl = NULL;
    rc = eng__gguf_chat(&f.g, path, &tpl, &c->bos, &c->eos, err, errlen);
    eng__gguf_close(&f);
    if (!rc) rc = parse_template(c, tpl, strlen(tpl), path, err, errlen);
    free(tpl);
    return rc;
}

int eng_chat_open(eng_chat **out, const char *path, char *err, size_t errlen) {
    *out = NULL;
    if (eng__is_gguf_path(path)) {
        eng_chat *c = calloc(1, sizeof *c);
        if (!c) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
        int rc = load_gguf(c, path, err, errlen);
        if (rc) { eng_chat_close(c); return rc; }
        *out = c;
        return ENG_OK;
    }
    char cfg[4096];
    struct stat sb;
    size_t pl = strlen(path);
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        snprintf(cfg, sizeof cfg, "%s%stokenizer_config.json", path, pl && path[pl - 1] == '/' ? "" : "/");
    else snprintf(cfg, sizeof cfg, "%s", path);
    eng_chat *c = calloc(1, sizeof *c);
    if (!c) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    int rc = load_config(c, cfg, err, errlen);
    if (rc) { eng_chat_close(c); return rc; }
    *out = c;
    return ENG_OK;
}

void eng_chat_close(eng_chat *c) {
    if (!c) return;
    eng__jinja_free(c->tpl);
    free(c->bos);
    free(c->eos);
    free(c);
}

/* Fill in the special tokens and add_generation_prompt where the context has none, then render. */
static int render(const eng_chat *c, cJSON *ctx, char **out, size_t *len, char *err, size_t errlen) {
    const char *keys[] = {"bos_token", "eos_token"}, *vals[] = {c->bos, c->eos};
    for (int i = 0; i < 2; i++)
        if (vals[i] && !cJSON_HasObjectItem(ctx, keys[i]) && !cJSON_AddStringToObject(ctx, keys[i], vals[i]))
            return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    if (!cJSON_HasObjectItem(ctx, "add_generation_prompt") && !cJSON_AddFalseToObject(ctx, "add_generation_prompt"))
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    return eng__jinja_render(c->tpl, ctx, out, len, err, errlen);
}

int eng_chat_render(const eng_chat *c, const eng_chat_msg *msgs, size_t n, int add_generation_prompt, char **out,
                    size_t *len, char *err, size_t errlen) {
    *out = NULL;
    *len = 0;
    cJSON *ctx = cJSON_CreateObject(), *list = cJSON_AddArrayToObject(ctx, "messages");
    int rc = list && cJSON_AddBoolToObject(ctx, "add_generation_prompt", add_generation_prompt) ? ENG_OK : ENG_ENOMEM;
    for (size_t i = 0; !rc && i < n; i++) {
        if (!msgs[i].role) { rc = eng__fail(err, errlen, ENG_EINVAL, "message %zu has no role", i); break; }
        cJSON *m = cJSON_CreateObject();
        if (!cJSON_AddItemToArray(list, m) || !cJSON_AddStringToObject(m, "role", msgs[i].role) ||
            !(msgs[i].content ? cJSON_AddStringToObject(m, "content", msgs[i].content) : cJSON_AddNullToObject(m, "content")))
            rc = ENG_ENOMEM;
    }
    if (rc == ENG_ENOMEM) eng__fail(err, errlen, rc, "out of memory");
    if (!rc) rc = render(c, ctx, out, len, err, errlen);
    cJSON_Delete(ctx);
    return rc;
}

/* Does the JSON text hold the escape \u0000? cJSON's strings are C strings
 * and would end there, where JavaScript's go on. */
static int has_nul_escape(const char *s, size_t n) {
    for (size_t i = 0; i + 5 < n; i++) {
        if (s[i] != '\\') continue;
        if (s[i + 1] == 'u' && !memcmp(s + i + 2, "0000", 4)) return 1;
        i++; /* the escaped character, maybe a backslash */
    }
    return 0;
}

int eng_chat_render_json(const eng_chat *c, const char *json, size_t json_len, char **out, size_t *len, char *err,
                         size_t errlen) {
    *out = NULL;
    *len = 0;
    if (has_nul_escape(json, json_len))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "the context holds U+0000 (\\u0000) in a string, which is not supported");
    cJSON *ctx = cJSON_ParseWithLength(json, json_len);
    int rc;
    if (!ctx) rc = eng__fail(err, errlen, ENG_EFORMAT, "the context is not valid JSON");
    else if (!cJSON_IsObject(ctx)) rc = eng__fail(err, errlen, ENG_EFORMAT, "the context must be a JSON object");
    else rc = render(c, ctx, out, len, err, errlen);
    cJSON_Delete(ctx);
    return rc;
}
