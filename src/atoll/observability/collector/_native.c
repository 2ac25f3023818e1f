/* The collector's span decoder in C: OTLP ExportTraceServiceRequest bytes to the rows
 * the store writes, for the usual encoding of the usual spans.
 *
 * Why C: in Python, turning a parsed request into rows cost the collector 6 to 13 us a
 * span (the attributes' JSON and index terms, one attribute access at a time), which on
 * two cores shared with the services it traces was most of what tracing cost them
 * (docs/benchmarks.md, "tracing"). This walk reads the wire format once.
 *
 * The contract, which tests/observability/collector/test_native.py checks against the
 * Python decoder (itself checked against upb's full parse):
 *
 *  - It must produce exactly the rows, operations and terms the Python decoder
 *    produces, or hand the work back. It never decides that a body is malformed.
 *  - What it does not read itself it must hand back: a whole request whose outer
 *    structure is unusual (unknown or repeated fields, groups, truncation) makes it
 *    return False, and the caller decodes the request in Python; a span that is unusual
 *    in any way (an unknown field, a field given twice, an attribute that is not a
 *    string, integer or boolean, a key given twice, an id or time the decoder rejects,
 *    truncated bytes...) goes to `slow_span`, which parses it with upb. Every byte of a
 *    body is thus validated by this walk or by upb.
 *  - Resources and scopes go to callbacks as their bytes, which upb parses (they are
 *    few, and their ids come from a digest of upb's serialization).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_ATTRIBUTES 64
#define MAX_EVENTS 32
#define MAX_LINKS 32
#define TERM_SLOTS 512
#define BLOOM_HASHES 7 /* as _terms.BLOOM_HASHES */

typedef struct {
    const uint8_t *data;
    Py_ssize_t len;
} Slice;

typedef struct {
    uint32_t number;
    uint32_t wire;
    uint64_t value;  /* varint, fixed64 or fixed32 */
    Slice bytes;     /* length-delimited */
} Field;

enum { WIRE_VARINT = 0, WIRE_I64 = 1, WIRE_LEN = 2, WIRE_I32 = 5 };
enum { FIELD_END = 0, FIELD_OK = 1, FIELD_BAD = -1 };

static int read_varint(const uint8_t **at, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *at;
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (p >= end) return -1;
        uint8_t byte = *p++;
        if (shift == 63 && byte > 1) return -1; /* more than 64 bits: upb decides */
        value |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *at = p;
            *out = value;
            return 0;
        }
    }
    return -1;
}

/* The next field of a message, or FIELD_END, or FIELD_BAD for anything this walk does
 * not read (groups, field 0, truncation): never an error of its own. */
static int next_field(const uint8_t **at, const uint8_t *end, Field *field) {
    if (*at >= end) return FIELD_END;
    uint64_t tag;
    if (read_varint(at, end, &tag) < 0 || tag > 0xFFFFFFFFu) return FIELD_BAD;
    field->number = (uint32_t)(tag >> 3);
    field->wire = (uint32_t)(tag & 7);
    if (field->number == 0) return FIELD_BAD;
    const uint8_t *p = *at;
    switch (field->wire) {
    case WIRE_VARINT:
        if (read_varint(at, end, &field->value) < 0) return FIELD_BAD;
        return FIELD_OK;
    case WIRE_I64:
        if (end - p < 8) return FIELD_BAD;
        field->value = 0;
        for (int i = 7; i >= 0; i--) field->value = (field->value << 8) | p[i];
        *at = p + 8;
        return FIELD_OK;
    case WIRE_I32:
        if (end - p < 4) return FIELD_BAD;
        field->value = (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
                       ((uint64_t)p[3] << 24);
        *at = p + 4;
        return FIELD_OK;
    case WIRE_LEN: {
        uint64_t len;
        if (read_varint(at, end, &len) < 0) return FIELD_BAD;
        if (len > (uint64_t)(end - *at)) return FIELD_BAD;
        field->bytes.data = *at;
        field->bytes.len = (Py_ssize_t)len;
        *at += len;
        return FIELD_OK;
    }
    default:
        return FIELD_BAD;
    }
}

/* Strict UTF-8, as Python's decoder and protobuf's string check take it: no overlong
 * forms, no surrogates, nothing above U+10FFFF. */
static uint64_t load64(const uint8_t *p) {
    uint64_t value;
    memcpy(&value, p, sizeof value);
    return value;
}

#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull

static int valid_utf8(Slice s) {
    const uint8_t *p = s.data, *end = s.data + s.len;
    while (p < end) {
        if (end - p >= 8 && !(load64(p) & HIGHS)) { /* eight ASCII bytes at once */
            p += 8;
            continue;
        }
        uint8_t c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            if (end - p < 2 || (p[1] & 0xC0) != 0x80) return 0;
            p += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
            if (c == 0xE0 && p[1] < 0xA0) return 0; /* overlong */
            if (c == 0xED && p[1] >= 0xA0) return 0; /* surrogate */
            p += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 ||
                (p[3] & 0xC0) != 0x80)
                return 0;
            if (c == 0xF0 && p[1] < 0x90) return 0; /* overlong */
            if (c == 0xF4 && p[1] >= 0x90) return 0; /* above U+10FFFF */
            p += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* Whether any of eight bytes is a control character, '"' or '\\' (bit tricks: a byte
 * below 0x20, or equal to one of the two, sets its high bit in the result). */
static int needs_escape(uint64_t w) {
    uint64_t quote = w ^ (ONES * '"'), backslash = w ^ (ONES * '\\');
    uint64_t found = ((w - ONES * 0x20) & ~w) | ((quote - ONES) & ~quote) |
                     ((backslash - ONES) & ~backslash);
    return (found & HIGHS) != 0;
}

/* --- a growable buffer for the JSON texts ------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buffer;

static int buffer_reserve(Buffer *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more) cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int buffer_add(Buffer *b, const char *text, Py_ssize_t len) {
    if (buffer_reserve(b, len) < 0) return -1;
    memcpy(b->data + b->len, text, (size_t)len);
    b->len += len;
    return 0;
}

#define BUFFER_LITERAL(b, text) buffer_add((b), (text), (Py_ssize_t)(sizeof(text) - 1))

static const char HEX[] = "0123456789abcdef";

/* A JSON string as msgspec writes it: '"' and '\\' escaped, control characters as \b \t
 * \n \f \r or \u00xx, everything else (0x7F and non-ASCII included) as it is. Room for
 * the string as it is, then for each escape as it comes: a long string must not make the
 * buffer six times its size. */
static int buffer_json_string(Buffer *b, Slice s) {
    if (buffer_reserve(b, s.len + 2) < 0) return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < s.len; i++) {
        if (s.len - i >= 8 && !needs_escape(load64(s.data + i))) { /* eight as they are */
            memcpy(out, s.data + i, 8);
            out += 8;
            i += 7;
            continue;
        }
        uint8_t c = s.data[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *out++ = (char)c;
            continue;
        }
        /* An escape (six bytes at most), the rest of the string and the closing quote. */
        b->len = out - b->data;
        if (buffer_reserve(b, 6 + (s.len - i - 1) + 1) < 0) return -1;
        out = b->data + b->len;
        *out++ = '\\';
        switch (c) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; break;
        case '\b': *out++ = 'b'; break;
        case '\t': *out++ = 't'; break;
        case '\n': *out++ = 'n'; break;
        case '\f': *out++ = 'f'; break;
        case '\r': *out++ = 'r'; break;
        default:
            *out++ = 'u';
            *out++ = '0';
            *out++ = '0';
            *out++ = HEX[c >> 4];
            *out++ = HEX[c & 15];
        }
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

static int buffer_unsigned(Buffer *b, uint64_t value) {
    char digits[24];
    int n = snprintf(digits, sizeof digits, "%llu", (unsigned long long)value);
    return buffer_add(b, digits, n);
}

static int buffer_signed(Buffer *b, int64_t value) {
    char digits[24];
    int n = snprintf(digits, sizeof digits, "%lld", (long long)value);
    return buffer_add(b, digits, n);
}

static int buffer_hex(Buffer *b, Slice s) {
    if (buffer_reserve(b, s.len * 2 + 2) < 0) return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < s.len; i++) {
        *out++ = HEX[s.data[i] >> 4];
        *out++ = HEX[s.data[i] & 15];
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* --- attribute terms: what the attribute index (a Bloom filter per chunk) holds -------
 *
 * A term is a 64-bit hash of the attribute's key and value, exactly as
 * `_terms.term_hash` computes it in Python: two CRC-32s (zlib's, the second seeded) of
 * the key's UTF-8, a NUL, a tag ('s' for text, 'n' for an integer) and the value (its
 * UTF-8, or its decimal digits). Booleans are the texts 'true' and 'false'. */

static uint32_t CRC_TABLE[256];
#define TERM_SEED 0x9E3779B9u

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        CRC_TABLE[i] = c;
    }
}

/* zlib's crc32(crc, data, len). */
static uint32_t crc_update(uint32_t crc, const uint8_t *data, Py_ssize_t len) {
    uint32_t c = crc ^ 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < len; i++) c = CRC_TABLE[(c ^ data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

typedef struct {
    uint32_t plain, seeded;
} TermHash;

static void term_add(TermHash *h, const uint8_t *data, Py_ssize_t len) {
    h->plain = crc_update(h->plain, data, len);
    h->seeded = crc_update(h->seeded, data, len);
}

/* --- attributes ---------------------------------------------------------------------- */

enum { VALUE_STRING = 1, VALUE_BOOL = 2, VALUE_INT = 3 };

typedef struct {
    Slice raw; /* the KeyValue's bytes */
    Slice key;
    int kind;
    Slice text;
    int64_t number; /* the integer, or the boolean as 0/1 */
} Attribute;

/* One KeyValue with a string, boolean or integer value, in any field order but each
 * field once: 1 if read, 0 if the span must go the slow way. */
static int read_attribute(Slice raw, Attribute *out) {
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    out->raw = raw;
    Field field;
    int have_key = 0, have_value = 0, status;
    Slice value = {NULL, 0};
    while ((status = next_field(&at, end, &field)) == FIELD_OK) {
        if (field.wire != WIRE_LEN) return 0;
        if (field.number == 1 && !have_key) {
            out->key = field.bytes;
            have_key = 1;
        } else if (field.number == 2 && !have_value) {
            value = field.bytes;
            have_value = 1;
        } else {
            return 0;
        }
    }
    if (status == FIELD_BAD || !have_key || !have_value || !valid_utf8(out->key)) return 0;
    at = value.data;
    end = value.data + value.len;
    if (next_field(&at, end, &field) != FIELD_OK || at != end) return 0; /* one field */
    if (field.number == 1 && field.wire == WIRE_LEN) {
        if (!valid_utf8(field.bytes)) return 0;
        out->kind = VALUE_STRING;
        out->text = field.bytes;
        return 1;
    }
    if (field.number == 2 && field.wire == WIRE_VARINT && field.value <= 1) {
        out->kind = VALUE_BOOL;
        out->number = (int64_t)field.value;
        return 1;
    }
    if (field.number == 3 && field.wire == WIRE_VARINT) {
        out->kind = VALUE_INT;
        out->number = (int64_t)field.value; /* two's complement, as protobuf's int64 */
        return 1;
    }
    return 0; /* doubles, bytes, arrays, maps: the slow way */
}

/* The attributes as a JSON object in `json`: 1 if done, 0 for the slow way. */
static int read_attributes(const Slice *raws, int count, Attribute *attrs, Buffer *json) {
    for (int i = 0; i < count; i++) {
        if (!read_attribute(raws[i], &attrs[i])) return 0;
        for (int j = 0; j < i; j++) { /* a key twice: the dict's rules, the slow way */
            if (attrs[j].key.len == attrs[i].key.len &&
                memcmp(attrs[j].key.data, attrs[i].key.data, (size_t)attrs[i].key.len) == 0)
                return 0;
        }
    }
    if (BUFFER_LITERAL(json, "{") < 0) return -1;
    for (int i = 0; i < count; i++) {
        Attribute *a = &attrs[i];
        if (i && BUFFER_LITERAL(json, ",") < 0) return -1;
        if (buffer_json_string(json, a->key) < 0 || BUFFER_LITERAL(json, ":") < 0) return -1;
        int failed;
        if (a->kind == VALUE_STRING) {
            failed = buffer_json_string(json, a->text);
        } else if (a->kind == VALUE_INT) {
            failed = buffer_signed(json, a->number);
        } else {
            failed = a->number ? BUFFER_LITERAL(json, "true") : BUFFER_LITERAL(json, "false");
        }
        if (failed < 0) return -1;
    }
    if (BUFFER_LITERAL(json, "}") < 0) return -1;
    return 1;
}

static PyObject *utf8(Slice s) {
    return PyUnicode_DecodeUTF8((const char *)s.data, s.len, "strict");
}

/* --- spans --------------------------------------------------------------------------- */

typedef struct {
    PyObject *rows;       /* list */
    PyObject *operations; /* set */
    PyObject *terms;      /* set, or NULL */
    PyObject *slow_span;  /* callable(span_bytes, resource_id, scope_id, service) */
    PyObject *resource_id;
    PyObject *scope_id;
    PyObject *service;
    /* Terms already added, by the bytes of their KeyValue: most attributes repeat from
     * span to span (messaging.system, the destination...), and a hit skips making the
     * term and adding it to the set again. Direct-mapped; a clash replaces. */
    Slice seen_raw[TERM_SLOTS];
    PyObject *seen_term[TERM_SLOTS];
    /* The last span's name and its (service, name) pair, added to `operations`. */
    Slice last_name;
    PyObject *last_name_text;
    Buffer attributes;
    Buffer events;
    Buffer links;
    Buffer scratch;
} Context;

typedef struct {
    Slice trace_id, span_id, trace_state, parent, name, status_message;
    uint64_t kind, start, end, status_code, flags;
    uint64_t dropped_attributes, dropped_events, dropped_links;
    Slice attributes[MAX_ATTRIBUTES];
    int attribute_count;
    Slice events[MAX_EVENTS];
    int event_count;
    Slice links[MAX_LINKS];
    int link_count;
} Span;

#define SEEN(bit) (seen & (1u << (bit)))

/* Status: 1 if read, 0 for the slow way. */
static int read_status(Slice raw, Span *span) {
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    Field field;
    unsigned seen = 0;
    int status;
    while ((status = next_field(&at, end, &field)) == FIELD_OK) {
        if (field.number > 3 || SEEN(field.number)) return 0;
        seen |= 1u << field.number;
        if (field.number == 2 && field.wire == WIRE_LEN && valid_utf8(field.bytes)) {
            span->status_message = field.bytes;
        } else if (field.number == 3 && field.wire == WIRE_VARINT && field.value < 0x80000000u) {
            span->status_code = field.value;
        } else {
            return 0;
        }
    }
    return status == FIELD_END;
}

static int all_zero(Slice s) {
    for (Py_ssize_t i = 0; i < s.len; i++)
        if (s.data[i]) return 0;
    return 1;
}

/* The span's fields: 1 if the fast way can take it, 0 if not. */
static int read_span(Slice raw, Span *span) {
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    Field field;
    unsigned seen = 0;
    int status;
    memset(span, 0, offsetof(Span, attributes));
    span->attribute_count = span->event_count = span->link_count = 0;
    while ((status = next_field(&at, end, &field)) == FIELD_OK) {
        uint32_t n = field.number;
        if (n > 16) return 0;
        int repeated = n == 9 || n == 11 || n == 13;
        if (!repeated) {
            if (SEEN(n)) return 0;
            seen |= 1u << n;
        }
        int wire = field.wire;
        switch (n) {
        case 1: case 2: case 3: case 4: case 5: case 9: case 11: case 13: case 15:
            if (wire != WIRE_LEN) return 0;
            break;
        case 7: case 8:
            if (wire != WIRE_I64) return 0;
            break;
        case 16:
            if (wire != WIRE_I32) return 0;
            break;
        default: /* 6, 10, 12, 14 */
            if (wire != WIRE_VARINT) return 0;
        }
        switch (n) {
        case 1: span->trace_id = field.bytes; break;
        case 2: span->span_id = field.bytes; break;
        case 3:
            if (!valid_utf8(field.bytes)) return 0;
            span->trace_state = field.bytes;
            break;
        case 4: span->parent = field.bytes; break;
        case 5:
            if (!valid_utf8(field.bytes)) return 0;
            span->name = field.bytes;
            break;
        case 6:
            if (field.value >= 0x80000000u) return 0;
            span->kind = field.value;
            break;
        case 7: span->start = field.value; break;
        case 8: span->end = field.value; break;
        case 9:
            if (span->attribute_count == MAX_ATTRIBUTES) return 0;
            span->attributes[span->attribute_count++] = field.bytes;
            break;
        case 10:
            if (field.value > 0xFFFFFFFFu) return 0;
            span->dropped_attributes = field.value;
            break;
        case 11:
            if (span->event_count == MAX_EVENTS) return 0;
            span->events[span->event_count++] = field.bytes;
            break;
        case 12:
            if (field.value > 0xFFFFFFFFu) return 0;
            span->dropped_events = field.value;
            break;
        case 13:
            if (span->link_count == MAX_LINKS) return 0;
            span->links[span->link_count++] = field.bytes;
            break;
        case 14:
            if (field.value > 0xFFFFFFFFu) return 0;
            span->dropped_links = field.value;
            break;
        case 15:
            if (!read_status(field.bytes, span)) return 0;
            break;
        case 16: span->flags = field.value; break;
        default: return 0;
        }
    }
    if (status != FIELD_END) return 0;
    /* What the decoder rejects (the slow way counts the reason). */
    if (span->trace_id.len != 16 || all_zero(span->trace_id)) return 0;
    if (span->span_id.len != 8 || all_zero(span->span_id)) return 0;
    if (span->parent.len != 0 && span->parent.len != 8) return 0;
    if (span->start > (uint64_t)INT64_MAX || span->end > (uint64_t)INT64_MAX) return 0;
    return 1;
}

/* The events as the JSON array the store keeps: 1, or 0 for the slow way. */
static int events_json(Context *ctx, const Span *span) {
    Buffer *json = &ctx->events;
    Attribute attrs[MAX_ATTRIBUTES];
    Slice raws[MAX_ATTRIBUTES];
    json->len = 0;
    if (BUFFER_LITERAL(json, "[") < 0) return -1;
    for (int i = 0; i < span->event_count; i++) {
        const uint8_t *at = span->events[i].data, *end = at + span->events[i].len;
        Field field;
        unsigned seen = 0;
        int status, count = 0;
        uint64_t time = 0, dropped = 0;
        Slice name = {(const uint8_t *)"", 0};
        while ((status = next_field(&at, end, &field)) == FIELD_OK) {
            uint32_t n = field.number;
            if (n > 4 || (n != 3 && SEEN(n))) return 0;
            seen |= 1u << n;
            if (n == 1 && field.wire == WIRE_I64) {
                time = field.value;
            } else if (n == 2 && field.wire == WIRE_LEN && valid_utf8(field.bytes)) {
                name = field.bytes;
            } else if (n == 3 && field.wire == WIRE_LEN && count < MAX_ATTRIBUTES) {
                raws[count++] = field.bytes;
            } else if (n == 4 && field.wire == WIRE_VARINT && field.value <= 0xFFFFFFFFu) {
                dropped = field.value;
            } else {
                return 0;
            }
        }
        if (status != FIELD_END) return 0;
        if (i && BUFFER_LITERAL(json, ",") < 0) return -1;
        if (BUFFER_LITERAL(json, "{\"name\":") < 0 || buffer_json_string(json, name) < 0 ||
            BUFFER_LITERAL(json, ",\"time_unix_nano\":") < 0 || buffer_unsigned(json, time) < 0 ||
            BUFFER_LITERAL(json, ",\"attributes\":") < 0)
            return -1;
        int done = read_attributes(raws, count, attrs, json);
        if (done <= 0) return done;
        if (BUFFER_LITERAL(json, ",\"dropped_attributes_count\":") < 0 ||
            buffer_unsigned(json, dropped) < 0 || BUFFER_LITERAL(json, "}") < 0)
            return -1;
    }
    if (BUFFER_LITERAL(json, "]") < 0) return -1;
    return 1;
}

/* The links as the JSON array the store keeps: 1, or 0 for the slow way. */
static int links_json(Context *ctx, const Span *span) {
    Buffer *json = &ctx->links;
    Attribute attrs[MAX_ATTRIBUTES];
    Slice raws[MAX_ATTRIBUTES];
    json->len = 0;
    if (BUFFER_LITERAL(json, "[") < 0) return -1;
    for (int i = 0; i < span->link_count; i++) {
        const uint8_t *at = span->links[i].data, *end = at + span->links[i].len;
        Field field;
        unsigned seen = 0;
        int status, count = 0;
        uint64_t flags = 0;
        Slice empty = {(const uint8_t *)"", 0};
        Slice trace_id = empty, span_id = empty, trace_state = empty;
        while ((status = next_field(&at, end, &field)) == FIELD_OK) {
            uint32_t n = field.number;
            if (n > 6 || (n != 4 && SEEN(n))) return 0;
            seen |= 1u << n;
            if (n == 6) {
                if (field.wire != WIRE_I32) return 0;
                flags = field.value;
            } else if (n == 5) {
                if (field.wire != WIRE_VARINT || field.value > 0xFFFFFFFFu) return 0;
            } else if (field.wire != WIRE_LEN) {
                return 0;
            } else if (n == 1) {
                trace_id = field.bytes;
            } else if (n == 2) {
                span_id = field.bytes;
            } else if (n == 3) {
                if (!valid_utf8(field.bytes)) return 0;
                trace_state = field.bytes;
            } else if (count < MAX_ATTRIBUTES) { /* 4 */
                raws[count++] = field.bytes;
            } else {
                return 0;
            }
        }
        if (status != FIELD_END) return 0;
        if (i && BUFFER_LITERAL(json, ",") < 0) return -1;
        if (BUFFER_LITERAL(json, "{\"trace_id\":") < 0 || buffer_hex(json, trace_id) < 0 ||
            BUFFER_LITERAL(json, ",\"span_id\":") < 0 || buffer_hex(json, span_id) < 0 ||
            BUFFER_LITERAL(json, ",\"trace_state\":") < 0 ||
            buffer_json_string(json, trace_state) < 0 ||
            BUFFER_LITERAL(json, ",\"attributes\":") < 0)
            return -1;
        int done = read_attributes(raws, count, attrs, json);
        if (done <= 0) return done;
        if (BUFFER_LITERAL(json, ",\"flags\":") < 0 || buffer_unsigned(json, flags) < 0 ||
            BUFFER_LITERAL(json, "}") < 0)
            return -1;
    }
    if (BUFFER_LITERAL(json, "]") < 0) return -1;
    return 1;
}

static PyObject *buffer_text(const Buffer *b) {
    return PyUnicode_DecodeUTF8(b->data, b->len, "strict");
}

static PyObject *optional_text(Slice s) {
    if (s.len == 0) Py_RETURN_NONE;
    return utf8(s);
}

static int same_bytes(Slice a, Slice b) {
    return a.len == b.len && (a.len == 0 || memcmp(a.data, b.data, (size_t)a.len) == 0);
}

/* A slot for a KeyValue's bytes: from its length and two 8-byte words (the end, where
 * values differ, and the middle), not every byte; a clash only costs a recomputation. */
static size_t slot_of(Slice raw) {
    uint64_t hash = (uint64_t)raw.len * 0x9E3779B97F4A7C15ull;
    if (raw.len >= 16) {
        hash ^= load64(raw.data + raw.len - 8) * 0xC2B2AE3D27D4EB4Full;
        hash ^= load64(raw.data + raw.len / 2 - 4) * 0x165667B19E3779F9ull;
    } else {
        for (Py_ssize_t i = 0; i < raw.len; i++) hash = (hash ^ raw.data[i]) * 1099511628211ull;
    }
    hash ^= hash >> 29;
    return (size_t)(hash % TERM_SLOTS);
}

/* Add the span's attribute terms (their hashes), as the Python decoder collects them. */
static int add_terms(Context *ctx, const Attribute *attrs, int count) {
    for (int i = 0; i < count; i++) {
        const Attribute *a = &attrs[i];
        size_t slot = slot_of(a->raw);
        if (ctx->seen_term[slot] != NULL && same_bytes(ctx->seen_raw[slot], a->raw)) continue;
        TermHash h = {0, TERM_SEED};
        term_add(&h, a->key.data, a->key.len);
        if (a->kind == VALUE_INT) {
            char digits[24];
            int n = snprintf(digits, sizeof digits, "%lld", (long long)a->number);
            term_add(&h, (const uint8_t *)"\0n", 2);
            term_add(&h, (const uint8_t *)digits, n);
        } else {
            term_add(&h, (const uint8_t *)"\0s", 2);
            if (a->kind == VALUE_STRING) {
                term_add(&h, a->text.data, a->text.len);
            } else if (a->number) {
                term_add(&h, (const uint8_t *)"true", 4);
            } else {
                term_add(&h, (const uint8_t *)"false", 5);
            }
        }
        PyObject *term = PyLong_FromUnsignedLongLong(((uint64_t)h.plain << 32) | h.seeded);
        if (term == NULL) return -1;
        if (PySet_Add(ctx->terms, term) < 0) {
            Py_DECREF(term);
            return -1;
        }
        Py_XSETREF(ctx->seen_term[slot], term);
        ctx->seen_raw[slot] = a->raw;
    }
    return 0;
}

static PyObject *bytes_of(Slice s) {
    return PyBytes_FromStringAndSize((const char *)s.data, s.len);
}

static PyObject *bytearray_of(Slice s) {
    return PyByteArray_FromStringAndSize((const char *)s.data, s.len);
}

static int slow_span(Context *ctx, Slice raw) {
    PyObject *data = bytes_of(raw);
    if (data == NULL) return -1;
    PyObject *result = PyObject_CallFunctionObjArgs(
        ctx->slow_span, data, ctx->resource_id, ctx->scope_id, ctx->service, NULL);
    Py_DECREF(data);
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

/* One span: a row appended, or the span handed to slow_span. -1 on a Python error. */
static int decode_span(Context *ctx, Slice raw) {
    Span span;
    Attribute attrs[MAX_ATTRIBUTES];
    if (!read_span(raw, &span)) return slow_span(ctx, raw);
    int done = 1;
    if (span.attribute_count) {
        ctx->attributes.len = 0;
        done = read_attributes(span.attributes, span.attribute_count, attrs, &ctx->attributes);
    }
    if (done > 0 && span.event_count) done = events_json(ctx, &span);
    if (done > 0 && span.link_count) done = links_json(ctx, &span);
    if (done < 0) return -1;
    if (done == 0) return slow_span(ctx, raw);

    /* A short row (12 fields) unless the span has one of the five usually NULL fields:
     * each NULL bound costs an adapter call (see ShortSpanRow in _decode.py). */
    int dropped = span.dropped_attributes || span.dropped_events || span.dropped_links;
    int full = span.status_message.len || span.trace_state.len || span.event_count ||
               span.link_count || dropped;
    Py_ssize_t size = full ? 17 : 12;
    PyObject *row = PyTuple_New(size);
    if (row == NULL) return -1;
    /* Ids as bytearray: CPython's sqlite3 binds a bytearray as it is, where bytes cost an
     * adapter lookup and call each (about 1,300 instructions). They compare equal. */
    PyObject *parent;
    if (span.parent.len == 0 || all_zero(span.parent)) {
        parent = Py_NewRef(Py_None);
    } else {
        parent = bytearray_of(span.parent);
    }
    PyObject *name;
    int new_name = ctx->last_name_text == NULL || !same_bytes(ctx->last_name, span.name);
    name = new_name ? utf8(span.name) : Py_NewRef(ctx->last_name_text);
    PyTuple_SET_ITEM(row, 0, bytearray_of(span.trace_id));
    PyTuple_SET_ITEM(row, 1, bytearray_of(span.span_id));
    PyTuple_SET_ITEM(row, 2, parent);
    PyTuple_SET_ITEM(row, 3, Py_NewRef(ctx->resource_id));
    PyTuple_SET_ITEM(row, 4, Py_NewRef(ctx->scope_id));
    PyTuple_SET_ITEM(row, 5, Py_XNewRef(name));
    PyTuple_SET_ITEM(row, 6, PyLong_FromUnsignedLongLong(span.kind));
    PyTuple_SET_ITEM(row, 7, PyLong_FromUnsignedLongLong(span.start));
    PyTuple_SET_ITEM(row, 8,
                     PyLong_FromUnsignedLongLong(span.end > span.start ? span.end - span.start : 0));
    PyTuple_SET_ITEM(row, 9, PyLong_FromUnsignedLongLong(span.status_code));
    PyTuple_SET_ITEM(row, 10, PyLong_FromUnsignedLongLong(span.flags));
    PyTuple_SET_ITEM(row, 11, span.attribute_count ? buffer_text(&ctx->attributes)
                                                   : Py_NewRef(Py_None));
    if (full) {
        PyTuple_SET_ITEM(row, 12, optional_text(span.status_message));
        PyTuple_SET_ITEM(row, 13, optional_text(span.trace_state));
        PyTuple_SET_ITEM(row, 14,
                         span.event_count ? buffer_text(&ctx->events) : Py_NewRef(Py_None));
        PyTuple_SET_ITEM(row, 15, span.link_count ? buffer_text(&ctx->links) : Py_NewRef(Py_None));
        if (dropped) {
            Buffer *json = &ctx->scratch;
            json->len = 0;
            if (BUFFER_LITERAL(json, "{\"attributes\":") < 0 ||
                buffer_unsigned(json, span.dropped_attributes) < 0 ||
                BUFFER_LITERAL(json, ",\"events\":") < 0 ||
                buffer_unsigned(json, span.dropped_events) < 0 ||
                BUFFER_LITERAL(json, ",\"links\":") < 0 ||
                buffer_unsigned(json, span.dropped_links) < 0 || BUFFER_LITERAL(json, "}") < 0) {
                Py_XDECREF(name);
                Py_DECREF(row);
                return -1;
            }
            PyTuple_SET_ITEM(row, 16, buffer_text(json));
        } else {
            PyTuple_SET_ITEM(row, 16, Py_NewRef(Py_None));
        }
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        if (PyTuple_GET_ITEM(row, i) == NULL) {
            Py_XDECREF(name);
            Py_DECREF(row);
            return -1;
        }
    }
    int failed = 0;
    if (new_name) { /* the same name as the last span's (same service): added already */
        PyObject *operation = PyTuple_Pack(2, ctx->service, name);
        if (operation == NULL) {
            Py_DECREF(name);
            Py_DECREF(row);
            return -1;
        }
        failed = PySet_Add(ctx->operations, operation);
        Py_DECREF(operation);
        ctx->last_name = span.name;
        Py_XSETREF(ctx->last_name_text, Py_NewRef(name));
    }
    Py_DECREF(name);
    if (failed == 0) failed = PyList_Append(ctx->rows, row);
    Py_DECREF(row);
    if (failed < 0) return -1;
    if (ctx->terms != NULL && span.attribute_count)
        return add_terms(ctx, attrs, span.attribute_count);
    return 0;
}

/* A message's fields, for the outer levels: each must be one of `allowed` (a bit per
 * field number), length-delimited, and those in `once` at most once. Returns 1 if so,
 * 0 if not (the request goes the Python way). Strings among them are checked by the
 * caller. */
static int plain_message(Slice raw, unsigned allowed, unsigned once) {
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    Field field;
    unsigned seen = 0;
    int status;
    while ((status = next_field(&at, end, &field)) == FIELD_OK) {
        if (field.number > 31 || !(allowed & (1u << field.number)) || field.wire != WIRE_LEN)
            return 0;
        if ((once & (1u << field.number)) && SEEN(field.number)) return 0;
        seen |= 1u << field.number;
        if (field.number == 3 && !valid_utf8(field.bytes)) return 0; /* schema_url */
    }
    return status == FIELD_END;
}

/* The bytes of field 1 (the resource or the scope), empty if absent. */
static Slice first_field(Slice raw) {
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    Field field;
    Slice found = {(const uint8_t *)"", 0};
    while (next_field(&at, end, &field) == FIELD_OK)
        if (field.number == 1) found = field.bytes;
    return found;
}

static int scope_spans(Context *ctx, Slice raw, PyObject *scope_cb) {
    if (!plain_message(raw, (1u << 1) | (1u << 2) | (1u << 3), (1u << 1) | (1u << 3))) return 0;
    PyObject *scope = bytes_of(first_field(raw));
    if (scope == NULL) return -1;
    ctx->scope_id = PyObject_CallOneArg(scope_cb, scope);
    Py_DECREF(scope);
    if (ctx->scope_id == NULL) return -1;
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    Field field;
    int result = 1;
    while (next_field(&at, end, &field) == FIELD_OK) {
        if (field.number == 2 && decode_span(ctx, field.bytes) < 0) {
            result = -1;
            break;
        }
    }
    Py_CLEAR(ctx->scope_id);
    return result;
}

static int resource_spans(Context *ctx, Slice raw, PyObject *resource_cb, PyObject *scope_cb) {
    if (!plain_message(raw, (1u << 1) | (1u << 2) | (1u << 3), (1u << 1) | (1u << 3))) return 0;
    PyObject *resource = bytes_of(first_field(raw));
    if (resource == NULL) return -1;
    PyObject *found = PyObject_CallOneArg(resource_cb, resource);
    Py_DECREF(resource);
    if (found == NULL) return -1;
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2) {
        Py_DECREF(found);
        PyErr_SetString(PyExc_TypeError, "resource callback must return (id, service)");
        return -1;
    }
    Py_CLEAR(ctx->last_name_text); /* another service: its operations are new */
    ctx->resource_id = Py_NewRef(PyTuple_GET_ITEM(found, 0));
    ctx->service = Py_NewRef(PyTuple_GET_ITEM(found, 1));
    Py_DECREF(found);
    const uint8_t *at = raw.data, *end = raw.data + raw.len;
    Field field;
    int result = 1;
    while (next_field(&at, end, &field) == FIELD_OK) {
        if (field.number == 2) {
            result = scope_spans(ctx, field.bytes, scope_cb);
            if (result <= 0) break;
        }
    }
    Py_CLEAR(ctx->resource_id);
    Py_CLEAR(ctx->service);
    return result;
}

PyDoc_STRVAR(decode_spans_doc,
"decode_spans(body, rows, operations, terms, resource, scope, slow_span) -> bool\n\n"
"Append the rows of an ExportTraceServiceRequest's spans to `rows`, their (service,\n"
"name) pairs to `operations` and their attribute terms to `terms` (unless None).\n"
"`terms` gets 64-bit hashes (see _terms.term_hash).\n"
"`resource(bytes) -> (id, service)` and `scope(bytes) -> id` are called with each\n"
"resource and scope as encoded; `slow_span(bytes, resource_id, scope_id, service)`\n"
"with each span this walk does not take itself. Returns False, having perhaps added\n"
"some, if the request's outer structure is unusual: decode it another way.");

static PyObject *decode_spans(PyObject *module, PyObject *args) {
    Py_buffer body;
    PyObject *rows, *operations, *terms, *resource_cb, *scope_cb, *slow_cb;
    if (!PyArg_ParseTuple(args, "y*O!O!OOOO:decode_spans", &body, &PyList_Type, &rows,
                          &PySet_Type, &operations, &terms, &resource_cb, &scope_cb,
                          &slow_cb))
        return NULL;
    Context ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.rows = rows;
    ctx.operations = operations;
    ctx.terms = terms == Py_None ? NULL : terms;
    ctx.slow_span = slow_cb;
    PyObject *result = NULL;
    if (ctx.terms != NULL && !PySet_Check(ctx.terms)) {
        PyErr_SetString(PyExc_TypeError, "terms must be a set or None");
        goto done;
    }
    Slice request = {(const uint8_t *)body.buf, body.len};
    if (!plain_message(request, 1u << 1, 0)) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    const uint8_t *at = request.data, *end = request.data + request.len;
    Field field;
    int status = 1;
    while (status > 0 && next_field(&at, end, &field) == FIELD_OK)
        status = resource_spans(&ctx, field.bytes, resource_cb, scope_cb);
    if (status >= 0) result = Py_NewRef(status ? Py_True : Py_False);
done:
    for (int i = 0; i < TERM_SLOTS; i++) Py_XDECREF(ctx.seen_term[i]);
    Py_XDECREF(ctx.last_name_text);
    PyMem_Free(ctx.attributes.data);
    PyMem_Free(ctx.events.data);
    PyMem_Free(ctx.links.data);
    PyMem_Free(ctx.scratch.data);
    PyBuffer_Release(&body);
    return result;
}

PyDoc_STRVAR(make_bloom_doc,
"make_bloom(terms, bits) -> bytes\n\n"
"A Bloom filter of `bits` bits (a power of two) holding the 64-bit `terms`, as\n"
"`_terms.make_bloom` makes it.");

static PyObject *make_bloom(PyObject *module, PyObject *args) {
    PyObject *terms;
    Py_ssize_t bits;
    if (!PyArg_ParseTuple(args, "On:make_bloom", &terms, &bits)) return NULL;
    if (bits < 8 || (bits & (bits - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "bits must be a power of two, at least 8");
        return NULL;
    }
    PyObject *bloom = PyBytes_FromStringAndSize(NULL, bits / 8);
    if (bloom == NULL) return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(bloom);
    memset(out, 0, (size_t)(bits / 8));
    PyObject *iterator = PyObject_GetIter(terms), *item;
    if (iterator == NULL) {
        Py_DECREF(bloom);
        return NULL;
    }
    uint64_t mask = (uint64_t)bits - 1;
    while ((item = PyIter_Next(iterator)) != NULL) {
        uint64_t term = PyLong_AsUnsignedLongLong(item);
        Py_DECREF(item);
        if (term == (uint64_t)-1 && PyErr_Occurred()) break;
        uint64_t first = term >> 32, step = (term & 0xFFFFFFFFu) | 1;
        for (uint64_t i = 0; i < BLOOM_HASHES; i++) {
            uint64_t bit = (first + i * step) & mask;
            out[bit >> 3] |= (uint8_t)(1u << (bit & 7));
        }
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) {
        Py_DECREF(bloom);
        return NULL;
    }
    return bloom;
}

static PyMethodDef methods[] = {
    {"decode_spans", decode_spans, METH_VARARGS, decode_spans_doc},
    {"make_bloom", make_bloom, METH_VARARGS, make_bloom_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "atoll.observability.collector._native",
    "The collector's span decoder in C (see _native.c and _decode.py).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
    return PyModule_Create(&module);
}
